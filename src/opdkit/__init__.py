"""opdkit: on-policy distillation of language models."""


def version() -> str:
    """The installed opdkit's version, for ``opd --version`` and reports."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("opdkit")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"
