"""Name lists the fact extractor classifies with: statement kinds, builtin function classes."""

from __future__ import annotations

# Parse-tree statement node -> kind. Statements not listed are DDL.
STATEMENT_KINDS: dict[str, str] = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "CopyStmt": "copy",
    "TransactionStmt": "transaction",
    "VariableSetStmt": "set",
    **dict.fromkeys(
        (
            "VariableShowStmt", "ExplainStmt", "PrepareStmt", "ExecuteStmt", "DeallocateStmt",
            "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt", "VacuumStmt", "ClusterStmt", "ReindexStmt",
            "LockStmt", "ListenStmt", "NotifyStmt", "UnlistenStmt", "CheckPointStmt", "LoadStmt", "DoStmt",
            "CallStmt", "DiscardStmt", "ConstraintsSetStmt", "AlterSystemStmt",
        ),
        "utility",
    ),
}

# For a multi-statement string the kind of its most consequential statement wins, so a write
# hidden after a read is never taken for a read.
KIND_PRIORITY: tuple[str, ...] = (
    "ddl", "merge", "delete", "update", "insert", "copy", "set", "transaction", "utility", "select",
    "unknown", "empty",
)

# Builtins whose result changes between calls, transactions or sessions: a result that uses them
# must not be served from a cache. User functions are unknown here; the cache refines with pg_proc.
VOLATILE_FUNCTIONS: frozenset[str] = frozenset({
    # time
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday", "age",
    "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp",
    # randomness and identifiers
    "random", "random_normal", "setseed", "gen_random_uuid", "uuidv4", "uuidv7",
    "uuid_generate_v1", "uuid_generate_v1mc", "uuid_generate_v4",
    # sequences and transactions
    "nextval", "currval", "lastval", "setval", "txid_current", "txid_current_if_assigned",
    "pg_current_xact_id", "pg_current_xact_id_if_assigned", "pg_current_snapshot", "txid_current_snapshot",
    # session state
    "current_user", "session_user", "current_role", "user", "current_catalog", "current_schema",
    "current_schemas", "current_database", "current_setting", "set_config", "pg_backend_pid",
    "inet_client_addr", "inet_client_port", "inet_server_addr", "inet_server_port", "pg_my_temp_schema",
    "pg_trigger_depth", "pg_postmaster_start_time", "pg_conf_load_time", "pg_current_wal_lsn",
    # side effects
    "pg_sleep", "pg_sleep_for", "pg_sleep_until", "pg_notify", "pg_advisory_lock", "pg_advisory_xact_lock",
    "pg_try_advisory_lock", "pg_try_advisory_xact_lock", "pg_advisory_unlock", "pg_advisory_unlock_all",
    "pg_advisory_lock_shared", "pg_advisory_xact_lock_shared", "pg_cancel_backend", "pg_terminate_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_stat_reset", "pg_stat_statements_reset", "dblink",
    "dblink_exec", "lo_import", "lo_export", "lo_create", "lo_creat", "lo_unlink", "pg_read_file",
    "pg_read_binary_file", "pg_ls_dir", "pg_stat_get_activity",
})

# Aggregates: one of these at the top of a SELECT without GROUP BY yields exactly one row.
AGGREGATE_FUNCTIONS: frozenset[str] = frozenset({
    "count", "sum", "avg", "min", "max", "any_value", "array_agg", "string_agg", "bool_and", "bool_or",
    "every", "bit_and", "bit_or", "bit_xor", "json_agg", "jsonb_agg", "json_agg_strict", "jsonb_agg_strict",
    "json_object_agg", "jsonb_object_agg", "json_object_agg_strict", "jsonb_object_agg_strict",
    "json_object_agg_unique", "jsonb_object_agg_unique", "xmlagg", "range_agg", "range_intersect_agg",
    "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr", "covar_pop",
    "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope",
    "regr_sxx", "regr_sxy", "regr_syy", "mode", "percentile_cont", "percentile_disc",
})

# Set-returning builtins: one in the target list can make any number of rows.
SET_RETURNING_FUNCTIONS: frozenset[str] = frozenset({
    "generate_series", "generate_subscripts", "unnest", "regexp_matches", "regexp_split_to_table",
    "string_to_table", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text", "json_array_elements",
    "jsonb_array_elements", "json_array_elements_text", "jsonb_array_elements_text", "json_object_keys",
    "jsonb_object_keys", "json_populate_recordset", "jsonb_populate_recordset", "json_to_recordset",
    "jsonb_to_recordset", "jsonb_path_query", "pg_ls_dir", "pg_get_keywords", "pg_options_to_table",
})

# Schemas whose relations are system catalogs.
CATALOG_SCHEMAS: frozenset[str] = frozenset({"pg_catalog", "information_schema"})

# DROP object types that remove a relation holding rows (their names count as written).
DROPPED_RELATION_TYPES: frozenset[str] = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
})
