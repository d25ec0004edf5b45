"""The reference runtime: `enginesmith.runtime` (see enginesmith/__init__.py)."""

if __name__ != "enginesmith.runtime":
    raise ImportError(f"import enginesmith.runtime, not {__name__}: the repository's packages import under "
                      "enginesmith. only (a second name would load their modules twice)")
