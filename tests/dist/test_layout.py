import pytest

from erc_megatron.dist import check_layout, expand_slurm_nodelist, read_launch_env
from erc_megatron.model.config import ConfigError, ModelConfig, ParallelConfig, layout_errors


def _model(**kw):
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                vocab_size=100, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def test_fitting_layout_has_no_errors():
    assert layout_errors(8, ParallelConfig(2, 2), _model()) == []


@pytest.mark.parametrize("world,par,model_kw,needles", [
    (6, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), {}, ["world size 6", "= 4"]),
    (4, dict(tensor_model_parallel_size=4), {}, ["num_query_groups (2)", "tensor_model_parallel_size (4)"]),
    (3, dict(tensor_model_parallel_size=3), dict(num_attention_heads=4, num_query_groups=4),
     ["num_attention_heads (4)", "tensor_model_parallel_size (3)"]),
    (3, dict(pipeline_model_parallel_size=3), {}, ["num_layers (4)", "pipeline_model_parallel_size (3)", "1.33"]),
    (2, dict(expert_model_parallel_size=2), {}, ["expert_model_parallel_size is 2", "dense"]),
    (2, dict(context_parallel_size=2), {}, ["context_parallel_size 2", "Transformer Engine"]),
])
def test_bad_layouts_name_the_numbers(world, par, model_kw, needles):
    with pytest.raises(ConfigError) as err:
        check_layout(world, ParallelConfig(**par), _model(**model_kw))
    for needle in needles:
        assert needle in str(err.value)


def test_padded_vocab_is_a_multiple_of_tp_times_divisor():
    m = _model(vocab_size=1000, make_vocab_size_divisible_by=128)
    assert m.padded_vocab_size(1) == 1024
    assert m.padded_vocab_size(4) == 1024
    assert m.padded_vocab_size(3) == 1152
    assert all(m.padded_vocab_size(tp) % tp == 0 and m.padded_vocab_size(tp) >= 1000 for tp in range(1, 9))


def test_model_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="num_query_groups"):
        _model(num_attention_heads=4, num_query_groups=3)
    with pytest.raises(ConfigError, match="params_dtype"):
        _model(params_dtype="float64")
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=0)


def test_launch_env_from_torchrun_slurm_and_mpi():
    e = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "h0", 1234, "torchrun")
    e = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[007-009,012],login1"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 1, "gpu007", "slurm")
    e = read_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "mpi")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        read_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert read_launch_env({}).world_size == 1


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]
