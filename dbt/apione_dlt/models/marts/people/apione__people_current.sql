{{ config(enabled=apione_dlt.enabled('people')) }}
{{ apione_dlt.current('people') }}
