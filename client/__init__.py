"""Clients, the load benchmark and the bottleneck analysis: `enginesmith.client` (see enginesmith/__init__.py)."""

if __name__ != "enginesmith.client":
    raise ImportError(f"import enginesmith.client, not {__name__}: the repository's packages import under "
                      "enginesmith. only (a second name would load their modules twice)")
