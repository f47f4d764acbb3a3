"""SpecOps Kubernetes operator: CR models, CRD generation, pure builders and thin kopf handlers.

`api`, `crdgen`, `conditions`, `validation`, `status` and `builders` import only pydantic and
yaml, so the workload CLI (`specops run`, `specops crds`) can use them; kopf and the
Kubernetes client are imported only by `handlers`, `kube` and `__main__ run`.
"""

GROUP = "specops.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PREFIX = "specops.dev"
"""Prefix of our labels, annotations, finalizer and kopf progress records."""
