-- Records billed per day, enrichment type and reason. ApiOne bills every record of a job
-- it creates; a record is a key in a job (input rows sharing a key share it), and a row
-- that reused a fresh result (attempt 0) was not sent.
{%- set types = var('apione_enrichment_types', ['companies', 'people', 'email_checks']) %}
{{ config(enabled=(types | length > 0)) }}
with sent as (
    {%- for enrichment in types %}
    select
        '{{ apione_dlt.enrichment_type(enrichment) }}' as enrichment_type,
        job_id, key, attempt, status, submitted_at, finished_at
    from {{ ref('stg_apione__' ~ enrichment ~ '_outcomes') }}
    where attempt > 0
    {%- if not loop.last %}
    union all
    {%- endif %}
    {%- endfor %}
),

-- one row per record; a job written again after a crash may differ in status: the
-- last written is the job's
records as (
    select enrichment_type, job_id, key, attempt, status, submitted_at
    from (
        select
            sent.*,
            row_number() over (
                partition by enrichment_type, job_id, key order by finished_at desc
            ) as nth_latest
        from sent
    ) as written
    where nth_latest = 1
),

sequenced as (
    select
        records.*,
        lag(status) over (
            partition by enrichment_type, key order by submitted_at, job_id
        ) as previous_status,
        row_number() over (
            partition by enrichment_type, key order by submitted_at, job_id
        ) as times_sent
    from records
),

reasons as (
    select
        enrichment_type,
        job_id,
        submitted_at,
        case
            -- a submit whose answer never came: billed only if ApiOne created the job
            when status = 'lost' then 'lost_submit'
            when attempt > 1 and previous_status in ('expired', 'vanished')
                then 'resubmitted_after_expiry'
            when attempt > 1 and previous_status = 'lost' then 'resubmitted_after_lost_answer'
            when attempt > 1 then 'resubmitted_after_failure'
            when times_sent > 1 then 'refresh'
            else 'first_send'
        end as reason,
        1 as records
    from sequenced

    union all

    -- jobs still running have no outcomes yet: billed, their reasons known once they end
    select type as enrichment_type, job_id, submitted_at, 'in_flight' as reason, record_count
    from {{ ref('stg_apione__jobs') }}
    where status = 'in_flight'
    {%- if types %}
        and type in ({% for t in types %}'{{ apione_dlt.enrichment_type(t) }}'{% if not loop.last %}, {% endif %}{% endfor %})
    {%- endif %}
)

select
    {{ apione_dlt.utc_date('submitted_at') }} as billed_on,
    enrichment_type,
    reason,
    count(distinct job_id) as jobs,
    sum(records) as records_billed
from reasons
group by 1, 2, 3
