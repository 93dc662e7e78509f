import pytest
from conftest import tiny_params

from nblib.data import sources
from nblib.setup import params


def test_presets_resolve_and_none_means_the_presets_value(tmp_path):
    cfg = params.resolve({"preset": "kaggle-t4", "n_layer": None, "output_dir": str(tmp_path)})
    assert cfg.model.n_layer == 8 and cfg.model.vocab_size == 50257
    assert cfg.train.global_batch == 64 and cfg.train.tokens_per_step == 64 * 512
    assert cfg.data.dataset == "Salesforce/wikitext"
    assert params.resolve({"preset": "cpu-demo"}).data.dataset == "builtin:python-docs"


def test_another_dataset_drops_the_presets_configuration_and_an_empty_one_is_a_value(tmp_path):
    kaggle = {"preset": "kaggle-t4", "output_dir": str(tmp_path)}
    assert params.resolve(kaggle).data.dataset_config == "wikitext-103-raw-v1"
    assert params.resolve({**kaggle, "dataset": "roneneldan/TinyStories"}).data.dataset_config == ""
    assert params.resolve({**kaggle, "dataset": "Salesforce/wikitext"}).data.dataset_config == "wikitext-103-raw-v1"
    assert params.resolve({**kaggle, "dataset_config": ""}).data.dataset_config == ""
    with pytest.raises(ValueError, match=r"dataset='': name a dataset, or None for the preset's"):
        params.resolve({**kaggle, "dataset": ""})


def test_parameters_override_the_preset_and_a_notebooks_other_names_are_ignored(tmp_path):
    namespace = {"__name__": "__main__", "In": [], "unrelated_global": object()}
    cfg = params.resolve({**tiny_params(tmp_path), "n_layer": 3, **namespace})
    assert cfg.model.n_layer == 3 and cfg.train.precision == "fp32"


@pytest.mark.parametrize("override, message", [
    ({"preset": "gpu-huge"}, r"preset='gpu-huge': must be one of kaggle-t4, cpu-demo, smoke"),
    ({"n_embd": 30, "n_head": 4}, r"n_embd=30: must be divisible by n_head=4"),
    ({"max_length": 64, "n_positions": 32}, r"max_length=64: must be <= n_positions=32"),
    ({"batch_size": 0}, r"batch_size=0: must be > 0"),
    ({"save_steps": -1}, r"save_steps=-1: must be > 0"),
    ({"warmup_steps": -5}, r"warmup_steps=-5: must be >= 0"),
    ({"learning_rate": 0.0}, r"learning_rate=0.0: must be > 0"),
    ({"precision": "fp8"}, r"precision='fp8': must be one of auto, fp32, fp16, bf16"),
    ({"tokenizer": "bpe:lots"}, r"tokenizer='bpe:lots': must be 'openai-community/gpt2', 'bpe:<vocab size>'"),
    ({"tokenizer": "bpe:100"}, r"bpe vocabulary must be between 260"),
    ({"tokenizer": "gpt2", "vocab_size": 1000}, r"vocab_size=1000: smaller than the tokenizer's 50257"),
    ({"tokenizer": "bpe:4096", "vocab_size": 4000}, r"vocab_size=4000: smaller than the tokenizer's 4096"),
    ({"dataset": "/no/such/corpus.txt"}, r"dataset='/no/such/corpus.txt': no such file"),
    ({"dataset": "builtin:poems"}, r"dataset='builtin:poems': the built-in corpora are"),
    ({"resume_from_checkpoint": "/no/ckpt.pt"}, r"resume_from_checkpoint='/no/ckpt.pt': no such file"),
    ({"n_layer": 2.5}, r"n_layer=2.5: must be an integer"),
    ({"learning_rate": "fast"}, r"learning_rate='fast': must be a number"),
    ({"dry_run": "yes"}, r"dry_run='yes': must be True or False"),
    ({"devices": 0}, r"devices=0: must be 'auto' \(every GPU\) or a number of processes >= 1"),
    ({"devices": "all"}, r"devices='all': must be 'auto'"),
    ({"temperature": 0.0}, r"temperature=0.0: must be > 0"),
    ({"top_p": 1.5}, r"top_p=1.5: must be in \(0, 1\]"),
    ({"top_k": -1}, r"top_k=-1: must be >= 0"),
    ({"num_return_sequences": 0}, r"num_return_sequences=0: must be > 0"),
    ({"prompts": ["ok", 3]}, r"prompts=\['ok', 3\]: must be a list of strings"),
    ({"report_to": "mlflow"}, r"report_to='mlflow': must be one of none, tensorboard, wandb"),
    ({"lora_export": "both"}, r"lora_export='both': must be one of merged, adapter"),
    ({"export_dtype": "fp16"}, r"export_dtype='fp16': must be one of float32, float16, bfloat16"),
    ({"export_gguf": True, "gguf_type": "q4_k_m"}, r"""gguf_type='q4_k_m': must be one of "", q8_0, q4_0"""),
    ({"gguf_type": "q4_0"}, r"gguf_type='q4_0': set export_gguf=True too, or gguf_type=''"),
    ({"sample_from": "/no/model"}, r"sample_from='/no/model': no such directory or checkpoint"),
])
def test_each_rule_names_parameter_value_and_what_is_allowed(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        params.resolve(tiny_params(tmp_path, **override))


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        params.resolve(tiny_params(tmp_path, n_embd=30, n_head=4, batch_size=0, precision="x"))
    text = str(error.value)
    assert "n_embd=30" in text and "batch_size=0" in text and "precision='x'" in text


def test_saved_tokenizer_directory_sets_the_vocabulary_floor(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=r"vocab_size=100: smaller than the tokenizer's 300"):
        params.resolve(tiny_params(tmp_path, tokenizer=str(tokenizer_dir), vocab_size=100))


def test_hub_ids_and_local_paths_are_told_apart():
    assert not sources.is_local_dataset("Salesforce/wikitext")
    assert not sources.is_local_dataset("wikitext")
    assert sources.is_local_dataset("/kaggle/input/corpus")
    assert sources.is_local_dataset("data/*.txt")
    assert sources.is_local_dataset("corpus.parquet")


def test_to_dict_is_plain_json(tmp_path):
    d = params.resolve(tiny_params(tmp_path)).to_dict()
    assert d["model"]["n_embd"] == 32 and isinstance(d["output_dir"], str)


def test_one_prompt_as_a_string_and_sampling_settings_resolve(tmp_path):
    cfg = params.resolve(tiny_params(tmp_path, prompts="Once upon", temperature=1.2, generation_seed=7))
    assert cfg.sampling.prompts == ("Once upon",) and cfg.sampling.temperature == 1.2
    assert cfg.sampling.seed == 7 and cfg.train.seed == 42  # the training seed stays apart


def test_misspelt_names_are_refused_but_a_notebooks_own_variables_are_not():
    with pytest.raises(ValueError, match=r"unknown parameter learnin_rate; did you mean learning_rate\?"):
        params.resolve({"preset": "smoke", "learnin_rate": 0.1})  # a job file: every key is a parameter
    injected = "# Parameters\npreset = \"smoke\"\nlearnin_rate = 0.1\n"
    kernel = {"__name__": "__main__", "In": ["", "import nblib", injected], "x": 3, "preset": "smoke"}
    with pytest.raises(ValueError, match=r"unknown parameter learnin_rate; did you mean learning_rate\?"):
        params.resolve({**kernel, "learnin_rate": 0.1})
    interactive = {**kernel, "In": ["", "x = 3\nlearnin_rate = 0.1"], "learnin_rate": 0.1}
    assert params.resolve(interactive).train.learning_rate == 3e-3  # a user's own names are theirs
    with pytest.raises(ValueError, match=r"unknown parameter zzz \(the parameters are listed in docs/parameters.md\)"):
        params.resolve({"preset": "smoke", "zzz": 1})
