// token-reaper as a NestJS dynamic module: forRoot with the options, or forRootAsync with a
// factory (a ConfigService's values, say). The module is global, as an app has one reaper,
// and it provides TokenReaper and TokenReaperHealthIndicator. Written without decorators, so
// the package needs no decorator settings: a dynamic module's metadata is the object
// returned, and factory providers name their dependencies in `inject`.
import type { DynamicModule, Provider } from '@nestjs/common';
import { ModuleRef } from '@nestjs/core';
import { TokenReaperHealthIndicator } from './health.cjs';
import type { TokenReaperModuleAsyncOptions, TokenReaperModuleOptions } from './options.cjs';
import { TokenReaper } from './token-reaper.cjs';

export const TOKEN_REAPER_OPTIONS = Symbol('TOKEN_REAPER_OPTIONS');

export class TokenReaperModule {
  static forRoot(options: TokenReaperModuleOptions): DynamicModule {
    return moduleWith({ provide: TOKEN_REAPER_OPTIONS, useValue: options });
  }

  static forRootAsync({
    imports = [],
    useFactory,
    inject = [],
  }: TokenReaperModuleAsyncOptions): DynamicModule {
    return moduleWith({ provide: TOKEN_REAPER_OPTIONS, useFactory, inject }, imports);
  }
}

function moduleWith(
  options: Provider,
  imports: NonNullable<DynamicModule['imports']> = [],
): DynamicModule {
  return {
    module: TokenReaperModule,
    global: true,
    imports,
    providers: [
      options,
      {
        provide: TokenReaper,
        useFactory: (moduleOptions: TokenReaperModuleOptions, moduleRef: ModuleRef) =>
          new TokenReaper(moduleOptions, moduleRef),
        inject: [TOKEN_REAPER_OPTIONS, ModuleRef],
      },
      {
        provide: TokenReaperHealthIndicator,
        useFactory: (reaper: TokenReaper) => new TokenReaperHealthIndicator(reaper),
        inject: [TokenReaper],
      },
    ],
    exports: [TokenReaper, TokenReaperHealthIndicator],
  };
}
