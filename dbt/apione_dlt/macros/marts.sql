{# The marts' SQL, one macro per kind of mart: each enrichment type's model calls it. #}

{% macro current(enrichment) %}
{#- One row per input row: its current status and, when matched, its enrichment. -#}
{%- set payload = apione_dlt.columns(enrichment) | reject('in', ['key', 'job_id', 'data_hash']) | list -%}
{%- set stg = 'stg_apione__' ~ enrichment -%}
with inputs as (
    select input_pk, key from {{ ref(stg ~ '_inputs') }}
),

rejected as (
    select input_pk, reason, detail from {{ ref(stg ~ '_rejected') }}
),

outcomes as (
    select input_pk, key, job_id, attempt, status, error, submitted_at, finished_at
    from {{ ref(stg ~ '_outcomes') }}
    where input_pk is not null
),

-- every input row the connector has seen: read, rejected, or with an outcome
-- (union all + distinct: BigQuery has no bare union)
input_rows as (
    select distinct input_pk from (
        select input_pk from inputs
        union all
        select input_pk from rejected
        union all
        select input_pk from outcomes
    ) as seen
),

-- a row's outcomes for the key it carries now (a changed row's old key no longer
-- counts), latest first by job order: when the job was sent, then the attempt; not
-- by when the outcome was written
ranked as (
    select
        outcomes.*,
        row_number() over (
            partition by outcomes.input_pk
            order by outcomes.submitted_at desc, outcomes.attempt desc,
                outcomes.finished_at desc, outcomes.job_id desc
        ) as position
    from outcomes
    left join inputs on inputs.input_pk = outcomes.input_pk
    where inputs.input_pk is null or inputs.key = outcomes.key
),

latest as (
    select * from ranked where position = 1
),

enrichment as (
    select key{% for c in payload %}, {{ c }}{% endfor %}
    from {{ ref(stg) }}
)

select
    input_rows.input_pk,
    coalesce(nullif(inputs.key, ''), latest.key) as key,
    case
        when rejected.input_pk is not null then 'rejected'
        when latest.input_pk is null then 'pending'
        else latest.status
    end as status,
    rejected.reason as rejection_reason,
    rejected.detail as rejection_detail,
    latest.job_id,
    latest.attempt,
    latest.error,
    latest.submitted_at,
    latest.finished_at,
    {{ dbt.datediff('latest.finished_at', dbt.current_timestamp(), 'hour') }} as result_age_hours
    {%- for c in payload %},
    enrichment.{{ c }}
    {%- endfor %}
from input_rows
left join inputs on inputs.input_pk = input_rows.input_pk
left join rejected on rejected.input_pk = input_rows.input_pk
left join latest
    on latest.input_pk = input_rows.input_pk and rejected.input_pk is null
left join enrichment
    on enrichment.key = latest.key and latest.status = 'matched'
{% endmacro %}


{% macro current_list(enrichment, list_table) %}
{#- The elements of a list of each key's current enrichment, flat. -#}
{%- set columns = apione_dlt.columns(list_table) -%}
select
    {% for c in columns %}elements.{{ c }}, {% endfor %}enrichment.enriched_at
from {{ ref('stg_apione__' ~ list_table) }} as elements
inner join {{ ref('stg_apione__' ~ enrichment) }} as enrichment
    on enrichment.key = elements.key and enrichment.job_id = elements.job_id
{% endmacro %}


{% macro enabled(enrichment) %}
{#- Whether the models of an enrichment type are built: the connector loads that type. -#}
{{ return(enrichment in var('apione_enrichment_types', ['companies', 'people', 'email_checks'])) }}
{% endmacro %}


{% macro utc_date(column) %}
{#- The UTC calendar day of a timestamp, whatever the session's time zone. -#}
{{ return(adapter.dispatch('utc_date', 'apione_dlt')(column)) }}
{% endmacro %}

{% macro default__utc_date(column) %}cast({{ column }} as date){% endmacro %}
{% macro duckdb__utc_date(column) %}cast(timezone('UTC', {{ column }}) as date){% endmacro %}
{% macro postgres__utc_date(column) %}cast(({{ column }} at time zone 'UTC') as date){% endmacro %}
{% macro snowflake__utc_date(column) %}to_date(convert_timezone('UTC', {{ column }})){% endmacro %}
{% macro bigquery__utc_date(column) %}date({{ column }}){% endmacro %}


{% macro enrichment_type(enrichment) %}
{#- The table name's type (companies) -> ApiOne's type (company), as in the job ledger. -#}
{{ return({'companies': 'company', 'people': 'people', 'email_checks': 'email'}[enrichment]) }}
{% endmacro %}
