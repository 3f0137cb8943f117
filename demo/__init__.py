"""The demo room: material that stands in for the world in the demo, the tests and the
benchmarks (shape images and the classifier that reads them back, a local image site
with LAION-schema metadata, token datasets, tiny random models) and the showcase a
person looks at after a run. Production code (pipeline, training, tokenizer) never
imports it; orchestration does, to run the demo."""
