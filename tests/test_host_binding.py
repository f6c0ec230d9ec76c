"""The HOST_* settings parsed into a binding, every mistake named by its setting."""

from __future__ import annotations

import pytest

from webhook_sync import errors
from webhook_sync.config import Config
from webhook_sync.host_binding import HostBinding, parse_host_binding

POST_MORTEM = {
    "HOST_TABLE": "public.user_models",
    "HOST_TRAINING_ID_COLUMN": "replicate_model_id",
    "HOST_STATUS_COLUMN": "training_status",
}


def test_no_host_table_means_no_binding() -> None:
    """Without HOST_TABLE (and no other HOST_* setting) there is no binding, and no
    problem."""
    assert parse_host_binding({}) == (None, [])
    assert Config.from_env({}).host_binding is None


def test_the_post_mortem_table_with_three_settings() -> None:
    """The post-mortem's `user_models` is bound by three settings; the rest default."""
    binding, problems = parse_host_binding(POST_MORTEM)

    assert problems == []
    assert binding == HostBinding(
        table_schema="public",
        table="user_models",
        training_id_column="replicate_model_id",
        user_id_column="user_id",
        status_column="training_status",
    )
    assert binding.qualified_table == "public.user_models"
    assert binding.in_flight_value == "training"
    assert binding.updated_at_column is None


def test_every_setting_is_read() -> None:
    """Each HOST_* setting lands in its field, names kept as given, unnamed spellings
    defaulted."""
    binding, problems = parse_host_binding(
        {
            "HOST_TABLE": "app.Models",
            "HOST_TRAINING_ID_COLUMN": "Replicate Id",
            "HOST_USER_ID_COLUMN": "owner_id",
            "HOST_STATUS_COLUMN": "state",
            "HOST_STATUS_VALUES": "training=in_progress, completed=ready",
            "HOST_UPDATED_AT_COLUMN": "modified",
            "HOST_COLUMNS": "version_id=replicate_version_id,weights_url=lora_url",
        }
    )

    assert problems == []
    assert binding is not None
    assert (binding.table_schema, binding.table) == ("app", "Models")
    assert binding.training_id_column == "Replicate Id"
    assert binding.spelling("training") == "in_progress"
    assert binding.spelling("completed") == "ready"
    assert binding.spelling("failed") == "failed"
    assert binding.in_flight_value == "in_progress"
    assert binding.updated_at_column == "modified"
    assert binding.extra_columns == (
        ("version_id", "replicate_version_id"),
        ("weights_url", "lora_url"),
    )


def test_a_bare_table_name_is_in_public() -> None:
    """HOST_TABLE without a schema names a table in `public`."""
    binding, _ = parse_host_binding({**POST_MORTEM, "HOST_TABLE": "user_models"})

    assert binding is not None
    assert binding.table_schema == "public"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"HOST_STATUS_COLUMN": "state"}, "HOST_STATUS_COLUMN: needs HOST_TABLE"),
        ({"HOST_TABLE": "user_models"}, "HOST_TRAINING_ID_COLUMN: must be set"),
        ({**POST_MORTEM, "HOST_TABLE": "a.b.c"}, "HOST_TABLE: must be table or schema.table"),
        ({**POST_MORTEM, "HOST_TABLE": "public."}, "HOST_TABLE: must be table or schema.table"),
        ({**POST_MORTEM, "HOST_STATUS_COLUMN": "x" * 64}, "HOST_STATUS_COLUMN: not a"),
        ({**POST_MORTEM, "HOST_STATUS_VALUES": "done=ready"}, "HOST_STATUS_VALUES: 'done'"),
        ({**POST_MORTEM, "HOST_STATUS_VALUES": "completed"}, "HOST_STATUS_VALUES: expected"),
        (
            {**POST_MORTEM, "HOST_STATUS_VALUES": "completed=done,failed=done"},
            "HOST_STATUS_VALUES: two of our statuses",
        ),
        ({**POST_MORTEM, "HOST_COLUMNS": "status=x"}, "HOST_COLUMNS: 'status' is not a field"),
        (
            {**POST_MORTEM, "HOST_COLUMNS": "weights_url=training_status"},
            "HOST_COLUMNS: training_status named twice",
        ),
    ],
)
def test_a_wrong_binding_names_its_setting(settings: dict[str, str], named: str) -> None:
    """Each mistake gives no binding and a problem that starts with its setting, and
    Config refuses it naming that setting."""
    binding, problems = parse_host_binding(settings)

    assert binding is None
    assert any(problem.startswith(named) for problem in problems), problems
    with pytest.raises(errors.ConfigError, match=named.split(":")[0]):
        Config.from_env(settings)


def test_a_wrong_binding_with_another_wrong_setting_is_a_plain_config_error() -> None:
    """Only a binding wrong by itself is a HostBindingError (exit 2); beside another
    invalid setting the error is a ConfigError naming both (exit 1)."""
    wrong_binding = {**POST_MORTEM, "HOST_COLUMNS": "status=x"}

    with pytest.raises(errors.HostBindingError):
        Config.from_env(wrong_binding)
    with pytest.raises(errors.ConfigError, match=r"PORT.*HOST_COLUMNS") as caught:
        Config.from_env({**wrong_binding, "PORT": "eighty"})
    assert not isinstance(caught.value, errors.HostBindingError)


def test_a_host_table_in_our_own_schema_is_refused() -> None:
    """HOST_TABLE in DATABASE_SCHEMA is refused naming the setting: a refusal there could
    not be told from an error of ours."""
    for settings in (
        {**POST_MORTEM, "HOST_TABLE": "webhook_sync.user_models"},
        {**POST_MORTEM, "HOST_TABLE": "app.user_models", "DATABASE_SCHEMA": "app"},
    ):
        with pytest.raises(
            errors.HostBindingError, match=r"HOST_TABLE: must not be in DATABASE_SCHEMA"
        ):
            Config.from_env(settings)

    assert Config.from_env({**POST_MORTEM, "DATABASE_SCHEMA": "app"}).host_binding is not None
