{{ config(enabled=apione_dlt.enabled('email_checks')) }}
{{ apione_dlt.current('email_checks') }}
