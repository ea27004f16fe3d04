"""Which functions an agent's statement may call.

Three outcomes, decided on the name a call resolves to in the catalog:

* a **denied** built-in blocks the statement wherever it appears, tagged data or not: it reads
  files, talks to other servers, runs SQL hidden in a string, signals or sleeps, takes advisory
  locks, changes settings, or exposes other sessions' statements or planner statistics;
* an **allowed** ``pg_catalog`` built-in is a pure computation over its arguments (string,
  number, date, JSON, array functions and aggregates used in ordinary analytics);
* anything else blocks: built-ins not on the list (fail closed), user-defined functions (their
  bodies may run arbitrary SQL) and names the catalog does not know.
"""

from __future__ import annotations

import enum
from fnmatch import fnmatchcase

_DENY_GLOBS: tuple[str, ...] = (
    "query_to_xml*",
    "query_to_xmlschema",
    "table_to_xml*",
    "table_to_xmlschema",
    "cursor_to_xml*",
    "cursor_to_xmlschema",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat",
    "dblink*",
    "lo_*",
    "loread",
    "lowrite",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_*",
    "pg_stat_file",
    "set_config",
    "pg_notify",
    "pg_sleep*",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_signal_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_advisory*",
    "pg_try_advisory*",
    "pg_logical_*",
    "pg_replication_*",
    "pg_create_*",
    "pg_drop_replication_slot",
    "pg_stat_get_activity",
    "pg_stat_get_backend_*",
    "pg_stat_statements*",
    "pg_blocking_pids",
    "pg_import_system_collations",
    "pg_file_*",
    "pg_switch_wal",
    "pg_promote",
    "pg_backup_*",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_log_backend_memory_contexts",
    "pg_current_logfile",
    "txid_current",
    "nextval",
    "setval",
    "pg_nextoid",
    "pg_visible_in_snapshot",
    "pg_snapshot_xip",
    "current_query",
    "pg_get_backend_memory_contexts",
    "pg_stat_reset*",
)

_ALLOW: frozenset[str] = frozenset(
    """
    pg_advisory_unlock_all
    abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log10 power pow mod div
    greatest least width_bucket random pi degrees radians sin cos tan asin acos atan atan2 scale
    gcd lcm factorial numeric_inc upper lower initcap length char_length character_length
    octet_length bit_length substr substring left right lpad rpad ltrim rtrim btrim trim replace
    translate reverse repeat position strpos split_part concat concat_ws format to_char
    to_number to_date to_timestamp md5 sha224 sha256 sha384 sha512 encode decode chr ascii
    quote_ident quote_literal quote_nullable starts_with regexp_replace regexp_match
    regexp_matches regexp_split_to_array regexp_split_to_table regexp_like regexp_count
    regexp_instr regexp_substr string_to_array array_to_string string_to_table overlay normalize
    unistr coalesce nullif now current_date current_time current_timestamp localtime
    localtimestamp statement_timestamp transaction_timestamp clock_timestamp timeofday
    date_trunc date_part extract date_bin age make_date make_time make_timestamp
    make_timestamptz make_interval justify_days justify_hours justify_interval isfinite timezone
    to_timestamp count sum avg min max bool_and bool_or every stddev stddev_pop stddev_samp
    variance var_pop var_samp corr covar_pop covar_samp regr_avgx regr_avgy regr_count
    regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy percentile_cont percentile_disc
    mode rank dense_rank percent_rank cume_dist row_number ntile lag lead first_value last_value
    nth_value string_agg array_agg json_agg jsonb_agg json_object_agg jsonb_object_agg bit_and
    bit_or bit_xor any_value row_to_json to_json to_jsonb json_build_object jsonb_build_object
    json_build_array jsonb_build_array json_object jsonb_object json_array_length
    jsonb_array_length json_extract_path json_extract_path_text jsonb_extract_path
    jsonb_extract_path_text json_typeof jsonb_typeof jsonb_set jsonb_insert jsonb_strip_nulls
    json_strip_nulls jsonb_pretty json_each json_each_text jsonb_each jsonb_each_text
    json_array_elements json_array_elements_text jsonb_array_elements jsonb_array_elements_text
    json_object_keys jsonb_object_keys jsonb_path_query jsonb_path_query_array
    jsonb_path_query_first jsonb_path_exists jsonb_path_match array_to_json array_length
    array_lower array_upper array_ndims array_dims array_position array_positions array_append
    array_prepend array_cat array_remove array_replace cardinality unnest generate_series
    generate_subscripts trim_array array_fill int2 int4 int8 float4 float8 numeric text varchar
    bpchar bool date timestamp timestamptz interval current_user current_role session_user
    current_schema current_schemas current_database current_catalog version current_setting
    pg_backend_pid inet_client_addr inet_server_addr pg_typeof format_type pg_get_viewdef
    pg_get_indexdef pg_get_constraintdef pg_get_expr pg_get_functiondef
    pg_get_function_arguments pg_get_function_result pg_get_triggerdef pg_get_ruledef
    pg_get_userbyid pg_get_serial_sequence pg_relation_size pg_total_relation_size pg_table_size
    pg_indexes_size pg_size_pretty pg_column_size pg_database_size has_table_privilege
    has_column_privilege has_schema_privilege has_database_privilege has_function_privilege
    pg_table_is_visible pg_type_is_visible pg_function_is_visible obj_description
    col_description shobj_description to_regclass to_regtype to_regproc pg_encoding_to_char
    pg_postmaster_start_time pg_is_in_recovery txid_current_if_assigned gen_random_uuid
    uuid_generate_v4 isempty lower_inc upper_inc lower_inf upper_inf range_merge int4range
    int8range numrange tsrange tstzrange daterange xmlelement xmlforest xmlconcat xmlagg
    xmlparse xmlserialize xmlcomment xmlpi xmlroot xmlexists
    like_escape similar_to_escape similar_escape overlaps collation_for
    """.split()  # noqa: SIM905 - a word list reads better than 300 quoted lines
)


class FunctionVerdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    NOT_ALLOWLISTED = "not_allowlisted"


#: names a deny glob catches that are harmless: releasing one's own advisory locks is what
#: connection pools (asyncpg's reset) do on every release.
_EXEMPT: frozenset[str] = frozenset({"pg_advisory_unlock_all"})


def is_denied(name: str) -> bool:
    """A built-in that is a side channel or side effect wherever it appears."""
    if name in _EXEMPT:
        return False
    return any(fnmatchcase(name, pattern) for pattern in _DENY_GLOBS)


def judge_builtin(name: str) -> FunctionVerdict:
    """Judge a ``pg_catalog`` function by name (the caller has resolved it in the catalog)."""
    if is_denied(name):
        return FunctionVerdict.DENIED
    if name in _ALLOW:
        return FunctionVerdict.ALLOWED
    return FunctionVerdict.NOT_ALLOWLISTED


def allowlisted_names() -> frozenset[str]:
    """The names of allowed built-ins (tests build small catalogs from these)."""
    return _ALLOW


#: Counting aggregates reveal how many rows there are, not what is in them.
COUNTING_AGGREGATES: frozenset[str] = frozenset({"count"})

#: Relations that leak data or other sessions' statements wherever they appear.
DENIED_RELATIONS: frozenset[str] = frozenset(
    {
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_statistic",
        "pg_statistic_ext",
        "pg_statistic_ext_data",
        "pg_stat_activity",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "pg_authid",
        "pg_shadow",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_largeobject",
        "pg_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_prepared_xacts",
        "pg_replication_slots",
        "pg_stat_replication",
        "pg_stat_wal_receiver",
        "pg_stat_subscription",
        "pg_locks",
    }
)
