// A table or partition as the catalog names it, and the ways statements refer to it. Every
// component works with relations resolved once by schema.ts, never with configured names.
import { sql, type FragmentSqlToken, type IdentifierSqlToken } from 'slonik';

export interface Relation {
  readonly schema: string;
  readonly name: string;
}

export function qualifiedName(relation: Relation) {
  return `${relation.schema}.${relation.name}`;
}

export function relationIdentifier(relation: Relation): IdentifierSqlToken {
  return sql.identifier([relation.schema, relation.name]);
}

/** A column of the relation, qualified by it: unambiguous inside any subquery. */
export function columnOf(relation: Relation, column: string): IdentifierSqlToken {
  return sql.identifier([relation.schema, relation.name, column]);
}

/** The relation as a regclass, resolved exactly as named (a plain ::regclass would fold case). */
export function regclassOf(relation: Relation): FragmentSqlToken {
  return sql.fragment`format('%I.%I', ${relation.schema}::text, ${relation.name}::text)::regclass`;
}
