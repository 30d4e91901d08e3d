{{ config(enabled=apione_dlt.enabled('companies')) }}
{{ apione_dlt.current('companies') }}
