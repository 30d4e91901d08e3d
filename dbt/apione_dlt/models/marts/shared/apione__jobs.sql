-- The job ledger, every enrichment type, with how long each job took and how old it is.
select
    job_id,
    type as enrichment_type,
    status,
    record_count,
    attempt,
    submitted_at,
    completed_at,
    expires_at,
    {{ dbt.datediff('submitted_at', 'completed_at', 'second') }} as duration_seconds,
    {{ dbt.datediff('submitted_at', dbt.current_timestamp(), 'hour') }} as age_hours,
    error,
    matched,
    not_found,
    invalid,
    errors,
    submitted_in_load,
    updated_in_load
from {{ ref('stg_apione__jobs') }}
