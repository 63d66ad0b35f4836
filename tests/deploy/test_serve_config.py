"""The ``serve deploy`` config: Ray's own schema accepts it, and its arguments build the application (the
flags are checked on the driver; no model is loaded)."""

from pathlib import Path

import pytest

CONFIG = Path(__file__).parents[2] / "deploy" / "serve_config.yaml"


def test_the_serve_config_is_valid_and_builds():
    yaml = pytest.importorskip("yaml")
    schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load(CONFIG.read_text())
    parsed = schema.ServeDeploySchema.model_validate(config)
    (application,) = parsed.applications
    assert application.import_path == "clex_serve.deploy.ray:build_app"

    from clex_serve.deploy.ray import build_app

    app = build_app({key: str(value) for key, value in application.args.items()})
    assert app is not None
