"""Assets REKI publishes, declared once. Consumers read the version from the asset event's extra."""

from airflow.sdk import Asset

# Published augmented vectors; the event extra carries version, uri and manifest_uri.
AUGMENTED_VECTORS = Asset(name="reki_augmented_vectors", uri="s3://reki-vectors/vectors", group="reki")
# A registered adaptor + backbone version (the lake's models/registry); extra carries the version.
ADAPTOR_MODEL = Asset(name="reki_adaptor_model", group="reki")
