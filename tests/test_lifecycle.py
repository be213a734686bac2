"""The create path's JSON without the json module: same answers as json, same refusals."""

import json
import math

import pytest

from mmshim.lifecycle import json_dumps, json_loads

SAMPLES = [
    '{"ociVersion": "1.0.2", "process": {"env": ["A=1", "AWS_BATCH_JOB_ID=x\\u00e9"], "terminal": false}}',
    ' \n[1, -2.5e3, true, null, "\\"quoted\\" \\\\ \\n"]\n',
    '{"nested": {"deep": [[], {}, [{"a": 1}]]}, "n": 0}',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_loads_matches_json(text: str) -> None:
    assert json_loads(text) == json.loads(text)


def test_loads_constants() -> None:
    assert math.isnan(json_loads("NaN")) and json_loads("[Infinity, -Infinity]") == [math.inf, -math.inf]


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "[1,]", "{'a': 1}", '"\x01"'])
def test_loads_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        json_loads(text)


def test_dumps_round_trips() -> None:
    value = {
        "job_id": 'j"\\\n\u00e9:1',
        "attempt": 2,
        "restored": None,
        "ok": True,
        "t": 1.5,
        "argv": ["--root", "/r"],
    }
    assert json.loads(json_dumps(value)) == value


@pytest.mark.parametrize(
    ("env", "identity", "protected"),
    [
        ({}, None, None),
        ({"AWS_BATCH_JOB_ID": "j", "AWS_BATCH_JOB_ATTEMPT": "3"}, ("j", 3), True),
        ({"MMSHIM_JOB_ID": "local", "MMSHIM_JOB_ATTEMPT": "2"}, ("local", 2), True),
        ({"AWS_BATCH_JOB_ID": "j", "AWS_BATCH_JOB_ATTEMPT": "x"}, ("j", 1), True),
        ({"AWS_BATCH_JOB_ID": "j", "MMSHIM_PROTECT": "off"}, ("j", 1), False),
        ({"AWS_BATCH_JOB_ID": "j", "MMSHIM_PROTECT": "yes please"}, ("j", 1), True),
    ],
)
def test_create_path_and_settings_read_the_job_alike(
    env: dict, identity: tuple | None, protected: bool
) -> None:
    """The light create path and mmshim.config (the watcher's view) agree on job, attempt, protection."""
    from mmshim.config import Settings, job_from_env
    from mmshim.lifecycle import job_identity, protection_off

    assert job_identity(env) == identity
    job = job_from_env(env, Settings())
    if identity is None:
        assert job is None
        return
    assert (job.job_id, job.attempt) == identity
    assert job.settings.protect is protected is (not protection_off(env))
    if "MMSHIM_PROTECT" in env:  # the job's own setting wins over the host's
        assert job_from_env(env, Settings(protect=not protected)).settings.protect is protected
