// The presets: one file per auth system, each reproducing that system's own cleanup command,
// written in the format of the targets file (config-file.ts expands and validates them).
import type { Preset } from '../rule.js';
import { authjs } from './authjs.js';
import { betterAuth } from './better-auth.js';
import { djangoOauthToolkit } from './django-oauth-toolkit.js';
import { doorkeeper } from './doorkeeper.js';
import { laravelPassport } from './laravel-passport.js';
import { oryHydra } from './ory-hydra.js';
import { supabaseAuth } from './supabase-auth.js';

const ALL: readonly Preset[] = [
  laravelPassport,
  oryHydra,
  doorkeeper,
  supabaseAuth,
  djangoOauthToolkit,
  betterAuth,
  authjs,
];

export const PRESETS: ReadonlyMap<string, Preset> = new Map(
  ALL.map((preset) => [preset.name, preset]),
);
export const PRESET_NAMES = ALL.map((preset) => preset.name);
