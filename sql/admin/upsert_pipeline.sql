-- Declare a pipeline, or replace its steps (runs already started keep theirs).
-- steps: a JSON array of {"model": ..., "input"?: template, "fan_out"?: path};
-- checked here (a bad path or field is refused, naming it).
--   psql "$DATABASE_URL" -v name=embed-docs \
--        -v steps='[{"model": "split"}, {"model": "minilm", "fan_out": "$.chunks"}]' \
--        -f sql/admin/upsert_pipeline.sql
\set ON_ERROR_STOP on
SELECT name, jsonb_array_length(steps) AS steps, updated_at
  FROM asyncinfer.upsert_pipeline(:'name', :'steps'::jsonb);
