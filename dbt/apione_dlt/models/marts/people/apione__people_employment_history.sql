{{ config(enabled=apione_dlt.enabled('people')) }}
{{ apione_dlt.current_list('people', 'people_employment_history') }}
