{% test every_input_row_once(model, column_name, inputs, rejected, outcomes) %}
{#- Every input row the connector has seen is in ``model`` exactly once, and nothing else. -#}
with seen as (
    select distinct input_pk from (
        select input_pk from {{ inputs }}
        union all
        select input_pk from {{ rejected }}
        union all
        select input_pk from {{ outcomes }} where input_pk is not null
    ) as all_seen
),

counted as (
    select {{ column_name }} as input_pk, count(*) as n from {{ model }} group by {{ column_name }}
)

select coalesce(seen.input_pk, counted.input_pk) as input_pk, coalesce(counted.n, 0) as n
from seen
full outer join counted on counted.input_pk = seen.input_pk
where seen.input_pk is null or counted.input_pk is null or counted.n <> 1
{% endtest %}
