"""The Triton model repository, tritonserver discovery and launch, the OpenAI front: `enginesmith.triton_repo`."""

if __name__ != "enginesmith.triton_repo":
    raise ImportError(f"import enginesmith.triton_repo, not {__name__}: the repository's packages import under "
                      "enginesmith. only (a second name would load their modules twice)")
