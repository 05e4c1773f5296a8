from dataclasses import dataclass, field

import pytest

from erc_megatron.model.config import ConfigError, ModelConfig, ParallelConfig
from erc_megatron.utils import config_tree


@dataclass
class _Tree:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = "x"
    ratio: float = 0.5
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_layers: 2\nparallel:\n  tensor_model_parallel_size: 2\nratio: 1e-3\n")
    cfg = config_tree.load(_Tree, p, ["model.hidden_size=32", "flag=true", "tags=[a, b]", "limit=null", "name=run1"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 32 and cfg.model.kv_channels == 8
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.ratio == 1e-3 and cfg.flag is True and cfg.tags == ["a", "b"] and cfg.limit is None and cfg.name == "run1"


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        config_tree.load(_Tree, None, ["model.num_layer=3"])
    assert "'num_layer'" in str(err.value) and "num_layers" in str(err.value) and "model" in str(err.value)


def test_bad_types_name_the_field():
    with pytest.raises(ConfigError, match="model.num_layers must be an integer"):
        config_tree.load(_Tree, None, ["model.num_layers=2.5"])
    with pytest.raises(ConfigError, match="flag must be true or false"):
        config_tree.load(_Tree, None, ["flag=maybe"])
    with pytest.raises(ConfigError, match="parallel.pipeline_model_parallel_size must be >= 1"):
        config_tree.load(_Tree, None, ["parallel.pipeline_model_parallel_size=0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        config_tree.load(_Tree, None, ["oops"])
