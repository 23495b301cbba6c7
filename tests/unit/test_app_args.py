"""The builder's args and the Serve configs: what users write in YAML is checked up front."""

import typing
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config.app_config import AppArgs
from deployments.config.model_config import ModelConfig, generator_deployment_name
from deployments.ingress.deployment import INGRESS_DEPLOYMENT
from serve_app import InvalidArgs, build_app, parse_args

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_configs_to_check():
    assert {path.name for path in CONFIG_FILES} >= {"local.yaml", "sd3.5-medium.yaml"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_file_is_a_valid_serve_config_with_valid_args(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.request_timeout_s, "every config sets a request timeout"
    for application in config.applications:
        assert application.import_path == "serve_app:build_app"
        args = parse_args(application.args)
        # The ingress answers a timed-out request in the API's error shape before Ray's
        # proxy cuts it off with a plain-text 408.
        assert args.request_timeout_s < config.http_options.request_timeout_s
        # The generators' options live with their models, in args.
        assert [deployment.name for deployment in application.deployments] == [INGRESS_DEPLOYMENT]
        for model in args.models:
            generator = model.deployment
            for option in (
                "max_ongoing_requests",
                "max_queued_requests",
                "graceful_shutdown_timeout_s",
                "autoscaling_config",
            ):
                assert option in generator, f"{path.name}: {model.id} must set {option}"
            assert "num_gpus" in generator["ray_actor_options"]
            # Batches form inside the replica, so it must hold enough requests to fill them.
            worker_threads, batching = args.engine_settings(model)
            full_batches = worker_threads * batching.max_batch_images
            assert generator["max_ongoing_requests"] >= full_batches
            autoscaling = generator["autoscaling_config"]
            assert autoscaling["target_ongoing_requests"] <= generator["max_ongoing_requests"]


def test_each_object_storage_config_is_its_siblings_but_for_storage():
    """config/<name>-s3.yaml is config/<name>.yaml with the images in a bucket: nothing else
    may drift between the two."""
    variants = [path for path in CONFIG_FILES if path.stem.endswith("-s3")]
    assert variants
    for variant in variants:
        with_bucket = yaml.safe_load(variant.read_text())
        plain = yaml.safe_load((CONFIG_DIR / f"{variant.stem[:-3]}.yaml").read_text())
        for config in (with_bucket, plain):
            config["applications"][0]["args"].pop("storage")
        assert with_bucket == plain, f"{variant.name} differs in more than args.storage"
        args = parse_args(yaml.safe_load(variant.read_text())["applications"][0]["args"])
        assert args.storage.s3 is not None and args.storage.s3.bucket


def test_gpu_config_asks_for_a_gpu_and_the_local_one_does_not():
    def generator_gpus(name: str) -> list[float]:
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        args = parse_args(config["applications"][0]["args"])
        return [model.deployment["ray_actor_options"]["num_gpus"] for model in args.models]

    assert generator_gpus("sd3.5-medium.yaml") == [1]
    assert generator_gpus("local.yaml") == [0, 0]


def test_gpu_config_requires_keys_and_the_local_one_does_not():
    def auth(name: str) -> bool:
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        return parse_args(config["applications"][0]["args"]).auth.enabled

    assert auth("sd3.5-medium.yaml")
    assert not auth("local.yaml")


def test_defaults_serve_the_embedded_model():
    args = parse_args({})
    assert [model.source for model in args.models] == ["embedded:tiny-sd3"]
    assert args.default_model_id == "tiny-sd3"
    assert args == AppArgs()


def test_the_local_config_serves_two_models_sd3_by_default():
    config = yaml.safe_load((CONFIG_DIR / "local.yaml").read_text())
    args = parse_args(config["applications"][0]["args"])
    assert [model.source for model in args.models] == ["embedded:tiny-sd3", "embedded:tiny-flux"]
    assert args.default_model_id == "tiny-sd3"


def test_models_must_have_distinct_ids_and_a_known_default():
    with pytest.raises(InvalidArgs, match="same id"):
        parse_args({"models": [{"id": "a"}, {"id": "a"}]})
    with pytest.raises(InvalidArgs, match="same id"):  # the same deployment name
        parse_args({"models": [{"id": "a/b"}, {"id": "a_b"}]})
    with pytest.raises(InvalidArgs, match="default_model"):
        parse_args({"models": [{"id": "a"}], "default_model": "b"})
    with pytest.raises(InvalidArgs, match=r"args\.models"):
        parse_args({"models": []})
    args = parse_args({"models": [{"id": "a"}, {"id": "b"}], "default_model": "b"})
    assert args.default_model_id == "b"


def test_pipeline_class_and_deployment_options_are_checked_up_front():
    with pytest.raises(InvalidArgs, match="no pipeline class named 'FluxPipelin'"):
        parse_args({"models": [{"pipeline_class": "FluxPipelin"}]})
    with pytest.raises(InvalidArgs, match=r"unknown deployment option.*num_replica"):
        parse_args({"models": [{"deployment": {"num_replica": 2}}]})
    with pytest.raises(InvalidArgs, match=r"args\.models\.0\.deployment"):
        parse_args({"models": [{"deployment": {"max_ongoing_requests": "many"}}]})
    args = parse_args({"models": [{"pipeline_class": "FluxPipeline"}]})
    assert args.models[0].pipeline_class == "FluxPipeline"


def test_each_model_gets_its_own_generator_deployment():
    assert generator_deployment_name("tiny-sd3") == "ImageGenerator:tiny-sd3"
    assert generator_deployment_name("stabilityai/sd3.5") == "ImageGenerator:stabilityai_sd3.5"


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(InvalidArgs) as caught:
        parse_args({"models": [{"id": "m", "sorce": "x"}], "workers": 3})
    message = str(caught.value)
    assert "args.models.0.sorce: unknown key" in message
    assert "args.workers: unknown key" in message


def test_bad_values_are_rejected_by_name():
    with pytest.raises(InvalidArgs, match=r"args\.worker_threads"):
        parse_args({"worker_threads": 0})
    with pytest.raises(InvalidArgs, match=r"args\.models\.0\.dtype"):
        parse_args({"models": [{"dtype": "float8"}]})


def test_default_size_must_fit_the_models_rules():
    with pytest.raises(InvalidArgs, match="multiple"):
        parse_args({"models": [{"default_size": "100x100"}]})
    with pytest.raises(InvalidArgs, match="max_pixels"):
        parse_args({"models": [{"default_size": "1024x1024"}], "limits": {"max_pixels": 4096}})


def test_video_models_are_checked_by_name():
    redis = {"redis_url": "redis://127.0.0.1:6379/0"}
    with pytest.raises(InvalidArgs, match=r"args\.videos: .*exactly one of redis_url"):
        parse_args({"videos": {}})
    with pytest.raises(InvalidArgs, match=r"args\.videos\.models\.0\.default_size"):
        parse_args({"videos": {**redis, "models": [{"default_size": "big"}]}})
    with pytest.raises(InvalidArgs, match="exceeds max_pixels"):
        parse_args({"videos": {**redis, "models": [{"default_size": "4000x4000"}]}})
    with pytest.raises(InvalidArgs, match="max_ongoing_requests is set by jobs_per_replica"):
        parse_args({"videos": {**redis, "models": [{"deployment": {"max_ongoing_requests": 4}}]}})
    with pytest.raises(InvalidArgs, match="lease_s must be shorter"):
        parse_args({"videos": {**redis, "lease_s": 10, "redelivery_s": 5}})
    assert parse_args({"videos": redis}).videos.models[0].id == "tiny-wan"


def test_defaults_must_be_within_the_limits():
    with pytest.raises(InvalidArgs, match="max_steps"):
        parse_args({"models": [{"default_steps": 30}], "limits": {"max_steps": 20}})
    with pytest.raises(InvalidArgs, match="max_guidance_scale"):
        parse_args({"models": [{"default_guidance_scale": 9}], "limits": {"max_guidance_scale": 8}})


def test_every_field_is_described():
    def fields(model):
        for name, field in model.model_fields.items():
            yield f"{model.__name__}.{name}", field
            # `S3Config | None` as well as `StorageConfig`.
            for annotation in typing.get_args(field.annotation) or (field.annotation,):
                if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                    yield from fields(annotation)

    for name, field in [*fields(AppArgs), *fields(ModelConfig)]:
        assert field.description, f"{name} has no description"


def test_build_app_binds_ingress_in_front_of_the_generator():
    app = build_app({"worker_threads": 3})
    assert app._bound_deployment.name == INGRESS_DEPLOYMENT


def test_the_configuration_page_documents_every_args_key():
    page = (CONFIG_DIR.parent / "docs" / "configuration.md").read_text()
    for section, field in AppArgs.model_fields.items():
        nested = field.annotation
        if section == "models":
            keys = [f"models[].{name}" for name in ModelConfig.model_fields]
        elif isinstance(nested, type) and hasattr(nested, "model_fields"):
            keys = [f"{section}.{name}" for name in nested.model_fields]
        else:
            keys = [section]
        for key in keys:
            assert f"`{key}`" in page, f"docs/configuration.md's `args:` table lacks `{key}`"


def test_a_model_may_have_its_own_engine_settings():
    args = parse_args(
        {
            "models": [
                {"id": "fast", "batching": {"max_batch_images": 16}, "worker_threads": 1},
                {"id": "plain"},
            ],
            "batching": {"max_batch_images": 2},
            "worker_threads": 3,
        }
    )
    fast, plain = args.models
    assert args.engine_settings(fast) == (1, fast.batching)
    assert args.engine_settings(fast)[1].max_batch_images == 16
    assert args.engine_settings(plain) == (3, args.batching)
    with pytest.raises(InvalidArgs, match=r"args\.models\.0\.batching\.max_batch_images"):
        parse_args({"models": [{"batching": {"max_batch_images": 0}}]})
