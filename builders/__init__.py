"""Recipe, planner, conversion, build targets and the CLI: `enginesmith.builders` (see enginesmith/__init__.py)."""

if __name__ != "enginesmith.builders":
    raise ImportError(f"import enginesmith.builders, not {__name__}: the repository's packages import under "
                      "enginesmith. only (a second name would load their modules twice)")
