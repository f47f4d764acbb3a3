"""Pure builders: a custom resource in, the child manifests it needs out (no API calls)."""
