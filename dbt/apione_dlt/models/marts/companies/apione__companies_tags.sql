{{ config(enabled=apione_dlt.enabled('companies')) }}
{{ apione_dlt.current_list('companies', 'companies_tags') }}
