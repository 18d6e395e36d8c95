// What a plain token table looks like to partition convert (see convert.ts): its
// indexes, constraints, triggers, sequences and grants, read from the catalog with the
// database clock, and every reason it cannot be converted safely. It also names what the
// conversion creates, so that a run after an interrupted one recognises its own leftovers.
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import { indexName, truncateName } from '../install.js';
import { keyReading, readLongestLifetime, type LifetimeReading } from '../sweep/partitions.js';
import { expiryColumnName, qualifiedName, regclassOf, type TableShape } from '../schema.js';

export interface IndexFacts {
  name: string;
  primary: boolean;
  unique: boolean;
  valid: boolean;
  /** The constraint the index backs (a primary key, unique or exclusion constraint). */
  constraintName: string | null;
  constraintType: string | null;
  constraintDefinition: string | null;
  /** pg_get_indexdef() after `ON schema.table `: `USING btree (…) … [WHERE …]`. */
  definitionTail: string | null;
  /** Key columns in order; `expr` for an expression, as PostgreSQL names its indexes. */
  keyColumns: string[];
}

export interface TriggerFacts {
  name: string;
  /** pg_get_triggerdef(), read before the swap: it names the table the parent takes over. */
  definition: string;
  /** pg_trigger.tgenabled: O (origin, the default), D (disabled), R (replica), A (always). */
  enabled: string;
}

export interface GrantFacts {
  privilege: string;
  /** null for PUBLIC. */
  grantee: string | null;
  grantable: boolean;
  /** A column privilege, or null for one on the table. */
  column: string | null;
}

export interface TableFacts {
  shape: TableShape;
  owner: string;
  currentUser: string;
  heapPages: number;
  storageParameters: string[] | null;
  indexes: IndexFacts[];
  /** Whether the name the default partition would get is taken (see conversionNames). */
  defaultNameTaken: boolean;
  /** The columns an INSERT may name (all but generated ones), in order. */
  insertableColumns: string[];
  /** CHECK constraints other than the conversion's own bound. */
  checks: { name: string; definition: string }[];
  triggers: TriggerFacts[];
  ownedSequences: { schema: string; name: string; column: string }[];
  grants: GrantFacts[];
  clock: LifetimeReading;
  problems: string[];
}

const tableRow = z.object({
  owner: z.string(),
  currentUser: z.string(),
  heapPages: z.number(),
  storageParameters: z.array(z.string()).nullable(),
  rowSecurity: z.boolean(),
  inheritance: z.boolean(),
  expiryNotNull: z.boolean(),
  expiryType: z.string(),
  identityColumns: z.array(z.string()).nullable(),
  publications: z.array(z.string()).nullable(),
  views: z.array(z.string()).nullable(),
  rules: z.boolean(),
  policies: z.boolean(),
  legacyNameTaken: z.boolean(),
  defaultNameTaken: z.boolean(),
  insertableColumns: z.array(z.string()),
});
const indexRow = z.object({
  name: z.string(),
  primary: z.boolean(),
  unique: z.boolean(),
  valid: z.boolean(),
  constraintName: z.string().nullable(),
  constraintType: z.string().nullable(),
  constraintDefinition: z.string().nullable(),
  definitionTail: z.string().nullable(),
  keyColumns: z.array(z.string()),
});
const constraintRow = z.object({
  name: z.string(),
  type: z.string(),
  definition: z.string(),
  onTable: z.string(),
  incoming: z.boolean(),
  noInherit: z.boolean(),
});
const triggerRow = z.object({ name: z.string(), definition: z.string(), enabled: z.string() });
const sequenceRow = z.object({ schema: z.string(), name: z.string(), column: z.string() });
const grantRow = z.object({
  privilege: z.string(),
  grantee: z.string().nullable(),
  grantable: z.boolean(),
  column: z.string().nullable(),
});

export async function readTableFacts(pool: DatabasePool, shape: TableShape): Promise<TableFacts> {
  const table = regclassOf(shape.relation);
  const where = qualifiedName(shape.relation);
  const expiry = expiryColumnName(shape)!;
  const names = conversionNames(shape);
  const facts = await pool.one(sql.type(tableRow)`
    SELECT pg_get_userbyid(c.relowner) AS owner, current_user::text AS "currentUser",
           (pg_relation_size(c.oid) / current_setting('block_size')::int)::float8 AS "heapPages",
           c.reloptions::text[] AS "storageParameters", c.relrowsecurity AS "rowSecurity",
           EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                   WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) AS inheritance,
           a.attnotnull AS "expiryNotNull", format_type(a.atttypid, a.atttypmod) AS "expiryType",
           (SELECT array_agg(attname::text ORDER BY attnum) FROM pg_catalog.pg_attribute
            WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attidentity <> '')
             AS "identityColumns",
           (SELECT array_agg(p.pubname::text ORDER BY p.pubname)
            FROM pg_catalog.pg_publication_rel pr
            JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
            WHERE pr.prrelid = c.oid) AS publications,
           -- Views are bound to the table itself, not to its name: after the swap they
           -- would read the legacy partition alone.
           (SELECT array_agg(DISTINCT r.ev_class::regclass::text)
            FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
            WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
              AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = c.oid
              AND r.ev_class <> c.oid) AS views,
           EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite WHERE ev_class = c.oid) AS rules,
           EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid = c.oid) AS policies,
           EXISTS (SELECT 1 FROM pg_catalog.pg_class other
                   WHERE other.relnamespace = c.relnamespace AND other.relname = ${names.legacy})
             AS "legacyNameTaken",
           EXISTS (SELECT 1 FROM pg_catalog.pg_class other
                   WHERE other.relnamespace = c.relnamespace AND other.relname = ${names.defaultPartition})
             AS "defaultNameTaken",
           ARRAY(SELECT attname::text FROM pg_catalog.pg_attribute
                 WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
                 ORDER BY attnum) AS "insertableColumns"
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = ${expiry}
    WHERE c.oid = ${table}
  `);
  // pg_get_indexdef() prints `CREATE [UNIQUE] INDEX name ON schema.table USING …`, quoting
  // each name the way quote_ident() does. What follows the table is the part the
  // partitioned table's index repeats.
  const indexes = await pool.any(sql.type(indexRow)`
    SELECT ic.relname AS name, i.indisprimary AS primary, i.indisunique AS unique,
           i.indisvalid AS valid, con.conname AS "constraintName",
           con.contype::text AS "constraintType",
           CASE WHEN con.oid IS NOT NULL THEN pg_get_constraintdef(con.oid) END
             AS "constraintDefinition",
           CASE WHEN starts_with(d.definition, d.prefix)
                THEN substr(d.definition, length(d.prefix) + 1) END AS "definitionTail",
           ARRAY(SELECT coalesce(a.attname::text, 'expr')
                 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
                 LEFT JOIN pg_catalog.pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = k.attnum AND k.attnum > 0
                 WHERE k.position <= i.indnkeyatts
                 ORDER BY k.position) AS "keyColumns"
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
    JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
    LEFT JOIN pg_catalog.pg_constraint con
      ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
    CROSS JOIN LATERAL (
      SELECT pg_get_indexdef(i.indexrelid) AS definition,
             format('CREATE %sINDEX %s ON %s.%s ', CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END,
                    quote_ident(ic.relname), quote_ident(n.nspname), quote_ident(t.relname)) AS prefix
    ) d
    WHERE i.indrelid = ${table}
    ORDER BY ic.relname
  `);
  const constraints = await pool.any(sql.type(constraintRow)`
    SELECT con.conname AS name, con.contype::text AS type,
           pg_get_constraintdef(con.oid) AS definition,
           con.conrelid::regclass::text AS "onTable", con.conrelid <> ${table} AS incoming,
           con.connoinherit AS "noInherit"
    FROM pg_catalog.pg_constraint con
    WHERE (con.conrelid = ${table} AND con.contype IN ('c', 'f', 'x'))
       OR (con.confrelid = ${table} AND con.contype = 'f')
    ORDER BY con.conname
  `);
  const triggers = await pool.any(sql.type(triggerRow)`
    SELECT tgname AS name, pg_get_triggerdef(oid) AS definition, tgenabled::text AS enabled
    FROM pg_catalog.pg_trigger
    WHERE tgrelid = ${table} AND NOT tgisinternal
    ORDER BY tgname
  `);
  // serial and bigserial columns: their sequence is owned by the column, and goes with the
  // table it belongs to. It has to belong to the parent, or dropping the legacy partition
  // would take the sequence of every future id with it.
  const ownedSequences = await pool.any(sql.type(sequenceRow)`
    SELECT sn.nspname AS schema, s.relname AS name, a.attname AS column
    FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
    JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
    JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
      AND d.refobjid = ${table} AND d.deptype = 'a'
    ORDER BY s.relname
  `);
  // The owner's own privileges come with ownership; everything else is granted again.
  const grants = await pool.any(sql.type(grantRow)`
    SELECT acl.privilege_type AS privilege,
           CASE WHEN acl.grantee = 0 THEN NULL ELSE pg_get_userbyid(acl.grantee)::text END AS grantee,
           acl.is_grantable AS grantable, NULL::text AS column
    FROM pg_catalog.pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) acl
    WHERE c.oid = ${table} AND acl.grantee <> c.relowner
    UNION ALL
    SELECT acl.privilege_type,
           CASE WHEN acl.grantee = 0 THEN NULL ELSE pg_get_userbyid(acl.grantee)::text END,
           acl.is_grantable, a.attname::text
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    CROSS JOIN LATERAL aclexplode(a.attacl) acl
    WHERE c.oid = ${table} AND acl.grantee <> c.relowner
  `);
  const reading = keyReading(shape);
  const clock = await readLongestLifetime(pool, shape);

  const problems: string[] = [];
  const byHand = 'or convert the table by hand';
  if (reading.kind === 'epoch') {
    problems.push(
      `${where}.${expiry} is ${facts.expiryType}, epoch ${reading.unit}; partition convert partitions a timestamp or timestamptz column by day. Convert it by hand, or change the column's type first.`,
    );
  }
  if (!facts.expiryNotNull) {
    problems.push(
      `${where}.${expiry} may be NULL, and a row without an expiry has no partition. Make it NOT NULL online: ADD CONSTRAINT … CHECK (${expiry} IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, then ALTER COLUMN ${expiry} SET NOT NULL (which then skips the scan).`,
    );
  }
  if (!indexes.some((index) => index.primary)) {
    problems.push(
      `${where} has no primary key; the partitioned table's key is built from it. Add one on ${shape.id?.column ?? 'id'}, ${byHand}.`,
    );
  }
  for (const constraint of constraints) {
    if (constraint.type === 'f' && constraint.incoming) {
      problems.push(
        `${where} is referenced by the foreign key ${constraint.name} on ${constraint.onTable}. A partitioned table can only be referenced through a unique key that includes ${expiry}, so that foreign key cannot stay. Drop it, ${byHand}.`,
      );
    } else if (constraint.type === 'f') {
      problems.push(
        `${where} has the foreign key ${constraint.name} (${constraint.definition}). Before PostgreSQL 18, a foreign key can only be added to a partitioned table by checking every row under a lock that blocks writes, so partition convert does not move it. Drop it first (the auth service then relies on its own checks), ${byHand}.`,
      );
    } else if (constraint.type === 'x') {
      problems.push(
        `${where} has the exclusion constraint ${constraint.name}, which a partitioned table cannot keep. Drop it, ${byHand}.`,
      );
    } else if (constraint.type === 'c' && constraint.noInherit) {
      problems.push(
        `${where} has the NO INHERIT check constraint ${constraint.name}, which a partitioned table cannot have. Drop it, ${byHand}.`,
      );
    }
  }
  if (facts.inheritance) {
    problems.push(
      `${where} takes part in table inheritance (it has a parent or children); partition convert handles a standalone table only. Convert it by hand.`,
    );
  }
  for (const column of facts.identityColumns ?? []) {
    problems.push(
      `${where}.${column} is an identity column, and PostgreSQL does not attach a table with one as a partition. Give it a sequence default instead (DROP IDENTITY, then DEFAULT nextval(…)), ${byHand}.`,
    );
  }
  if (facts.rowSecurity || facts.policies) {
    problems.push(
      `${where} uses row-level security; partition convert does not move policies. Convert it by hand.`,
    );
  }
  if ((facts.views ?? []).length > 0) {
    problems.push(
      `${where} is used by the view ${facts.views!.join(', ')}, which would keep reading the legacy partition alone. Drop it and create it again after converting, ${byHand}.`,
    );
  }
  if (facts.rules) {
    problems.push(
      `${where} has rewrite rules, which a partitioned table does not carry over. Drop them, ${byHand}.`,
    );
  }
  if (facts.legacyNameTaken) {
    problems.push(
      `${shape.relation.schema}.${names.legacy} already exists, and the table would become a partition of that name. Rename or drop it, then convert.`,
    );
  }
  if ((facts.publications ?? []).length > 0) {
    problems.push(
      `${where} is in the publication ${facts.publications!.join(', ')}; rows in new partitions would not be published. Convert it by hand and add the partitioned table to the publication.`,
    );
  }
  const primaryKey = indexes.find((index) => index.primary);
  const ours = new Set([
    ...(primaryKey ? [keyIndexName(shape, primaryKey.keyColumns)] : []),
    ...indexes.map((index) => twinNames(shape, index).twin),
  ]);
  for (const index of indexes) {
    if (!index.valid && !ours.has(index.name)) {
      problems.push(
        `${where} has the invalid index ${index.name} (an interrupted concurrent build). Drop it or REINDEX it, then convert.`,
      );
    } else if (index.definitionTail === null) {
      problems.push(`the definition of the index ${index.name} on ${where} could not be read.`);
    }
  }

  return {
    shape,
    owner: facts.owner,
    currentUser: facts.currentUser,
    heapPages: facts.heapPages,
    storageParameters: facts.storageParameters,
    defaultNameTaken: facts.defaultNameTaken,
    insertableColumns: facts.insertableColumns,
    indexes: [...indexes],
    checks: constraints
      .filter((constraint) => constraint.type === 'c' && constraint.name !== names.check)
      .map(({ name, definition }) => ({ name, definition })),
    triggers: [...triggers],
    ownedSequences: [...ownedSequences],
    grants: [...grants],
    clock,
    problems,
  };
}

/** The names the conversion gives; each fits PostgreSQL's 63 bytes. */
export function conversionNames(shape: TableShape) {
  const table = shape.relation.name;
  const withSuffix = (suffix: string) => truncateName(table, 63 - suffix.length) + suffix;
  const legacy = withSuffix('_legacy');
  return {
    legacy,
    /** Made only when rows expire at or after the bound (see conversion-plan.ts). */
    defaultPartition: withSuffix('_default'),
    check: truncateName(`${table}_${expiryColumnName(shape)!}_bound`),
    /**
     * What an index of the table is called once it belongs to the legacy partition: the name
     * install gives a partition's index (`<partition>_<column>_idx`), so that the partitioned
     * table's index keeps the name install knows it by.
     */
    legacyIndex: (name: string) =>
      truncateName(
        name.startsWith(table) ? `${legacy}${name.slice(table.length)}` : `${legacy}_${name}`,
      ),
  };
}

/** The unique (primary key columns…, expiry) index built before the swap. */
export function keyIndexName(shape: TableShape, primaryKeyColumns: readonly string[]) {
  return truncateName(
    `${shape.relation.name}_${[...primaryKeyColumns, expiryColumnName(shape)!].join('_')}_key`,
  );
}

/** For a unique index without the expiry: the parent's plain index and its twin on the table. */
export function twinNames(shape: TableShape, index: Pick<IndexFacts, 'keyColumns'>) {
  const parent = indexName(shape.relation.name, index.keyColumns.join('_'));
  return { parent, twin: conversionNames(shape).legacyIndex(parent) };
}
