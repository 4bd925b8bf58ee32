"""The run config: presets, YAML round trip, dotted overrides, and errors that name the key."""
import pytest

from seer import config as C


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_presets_are_valid_and_round_trip_through_yaml(name, tmp_path):
    cfg = C.validate(C.preset(name))
    C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_yaml(tmp_path / "c.yaml") == cfg


def test_contract_keys_exist():
    keys = set(C.all_keys())
    for key in ("train.max_steps", "train.device", "checkpoint.every", "parallel.tp", "model.depth",
                "loss.epsilon", "optim.lr", "data.source", "eval.knn_k", "logging.every"):
        assert key in keys


def test_overrides_are_typed_and_do_not_touch_the_input():
    base = C.preset("tiny")
    cfg = C.apply_overrides(base, ["train.max_steps=12", "optim.lr=0.5", "data.crops.global_scale=[0.2, 0.9]",
                                   "model.qk_norm=true", "data.source=/some/dir", "head.hidden_dims=[]",
                                   "logging.progress=off"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.data.crops.global_scale) == (12, 0.5, [0.2, 0.9])
    assert cfg.model.qk_norm is True and cfg.data.source == "/some/dir" and cfg.head.hidden_dims == []
    assert cfg.logging.progress == "off"
    assert base.train.max_steps == C.preset("tiny").train.max_steps  # a copy was changed, not the preset


def test_string_values_are_taken_as_written():
    cfg = C.apply_overrides(C.preset("tiny"), ["data.source=photos #1", "checkpoint.resume=010", "eval.dataset='a b'",
                                               "logging.progress=off", "checkpoint.dir=~", "train.device=cpu"])
    assert (cfg.data.source, cfg.checkpoint.resume, cfg.eval.dataset) == ("photos #1", "010", "a b")
    for value in ("[2020] photos", "shards/*.tar", "@list.txt", "a\tb"):  # not YAML either
        assert C.apply_overrides(C.preset("tiny"), [f"data.source={value}"]).data.source == value
    assert (cfg.logging.progress, cfg.checkpoint.dir, cfg.train.device) == ("off", "~", "cpu")


@pytest.mark.parametrize("override, fragment", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("trian.max_steps=3", "did you mean 'train.max_steps'"),
    ("checkpoint.evry=5", "did you mean 'checkpoint.every'"),
    ("parallel.tpp=2", "did you mean 'parallel.tp'"),
])
def test_unknown_key_suggests_the_nearest(override, fragment):
    with pytest.raises(C.ConfigError, match="unknown config key") as e:
        C.apply_overrides(C.preset("tiny"), [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=abc", "'train.max_steps' expects an integer"),
    ("optim.lr=[1]", "'optim.lr' expects a number"),
    ("model.qk_norm=3", "'model.qk_norm' expects true or false"),
    ("data.timeout_s=soon", "'data.timeout_s' expects a number"),
    ("data.index_workers=two", "'data.index_workers' expects an integer"),
    ("data.index_workers=1.5", "'data.index_workers' expects an integer"),
    ("train", "key=value"),
    ("model=3", "'model' is a section"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(C.ConfigError) as e:
        C.apply_overrides(C.preset("tiny"), [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.device=gpu", "train.device"), ("data.batch_size=0", "data.batch_size"),
    ("data.crops.global_size=30", "data.crops.global_size"), ("checkpoint.every=-1", "checkpoint.every"),
    ("loss.crops_for_assign=[0, 5]", "loss.crops_for_assign"), ("train.precision=fp8", "train.precision"),
    ("loss.crops_for_assign=[0, 0]", "loss.crops_for_assign"),  # was refused by swav_loss at the first step
    ("model.num_heads=5", "model.embed_dim"), ("data.crops.std=[1, 0, 1]", "data.crops.std"),
    ("optim.start_warmup_lr=-5", "optim.start_warmup_lr"), ("optim.final_lr=-1", "optim.final_lr"),
    ("optim.momentum=1.0", "optim.momentum"), ("loss.temperature=0", "loss.temperature"),
    ("loss.sinkhorn_iterations=0", "loss.sinkhorn_iterations"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.image_size=-8", "eval.image_size"),
    ("eval.max_images=-1", "eval.max_images"), ("data.digits_size=0", "data.digits_size"),
    # once caught only after the run had started, by classes the user never named
    ("head.output_dim=0", "head.output_dim"), ("head.hidden_dims=[0]", "head.hidden_dims"),
    ("data.crops.hue=5", "data.crops.hue"), ("data.crops.brightness=-1", "data.crops.brightness"),
    ("data.crops.blur_sigma=[1, 2000]", "data.crops.blur_sigma"), ("parallel.param_dtype=foo", "parallel.param_dtype"),
    ("parallel.reduce_dtype=int8", "parallel.reduce_dtype"), ("loss.epsilon=.inf", "loss.epsilon"),
    ("loss.temperature=.inf", "loss.temperature"), ("eval.knn_temperature=.inf", "eval.knn_temperature"),
    ("eval.dataset=", "eval.dataset"),  # was the current folder
    # accepted, then: every image skipped; a NaN decay into the probe; an overflow naming no key
    ("data.max_image_pixels=0", "data.max_image_pixels"), ("data.max_image_bytes=-1", "data.max_image_bytes"),
    ("eval.linear_weight_decays=[1, .nan]",
                                                            "eval.linear_weight_decays"),
    ("eval.linear_weight_decays=[.inf]", "eval.linear_weight_decays"),
    ("train.seed=99999999999999999999", "train.seed"), ("eval.split_seed=-9223372036854775809", "eval.split_seed"),
    ("optim.lr_reference_batch=-1", "optim.lr_reference_batch"),
    ("data.timeout_s=-1", "data.timeout_s"), ("data.timeout_s=.inf", "data.timeout_s"),
    ("data.timeout_s=.nan", "data.timeout_s"), ("data.index_workers=-1", "data.index_workers"),
    ("data.synthetic_count=0", "data.synthetic_count"), ("data.synthetic_count=-3", "data.synthetic_count"),
    ("data.synthetic_size=abc", "data.synthetic_size"), ("data.synthetic_size=0", "data.synthetic_size"),
    ("data.synthetic_size=64x0", "data.synthetic_size"),
    ("data.format=synth", "data.format"),
    # accepted, then the first step failed in PatchEmbed (the crops are RGB), naming no key
    ("model.in_chans=1", "model.in_chans"), ("model.in_chans=4", "model.in_chans"),
    # accepted, then every loss was NaN and the run stopped advising a lower optim.lr
    ("data.crops.noise_std=.inf", "data.crops.noise_std"), ("optim.final_weight_decay=.inf",
                                                             "optim.final_weight_decay"),
    ("data.crops.rotation_degrees=-1", "data.crops.rotation_degrees"),
    ("parallel.dp=0", "parallel.dp"), ("parallel.dp=-2", "parallel.dp"),  # (checked only once launched)
])
def test_validate_names_the_key(override, key):
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.apply_overrides(C.preset("tiny"), [override]))
    assert key in str(e.value)


def test_data_timeout_s_overrides_saves_and_defaults_in_older_files(tmp_path):
    assert C.apply_overrides(C.preset("tiny"), ["data.timeout_s=30"]).data.timeout_s == 30.0
    assert C.validate(C.apply_overrides(C.preset("tiny"), ["data.timeout_s=0"])).data.timeout_s == 0  # no timeout
    with pytest.raises(C.ConfigError, match=r"'data.timeout_s' must be a finite number >= 0 .*got -1"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.timeout_s=-1"]))
    saved = C.dumps(C.preset("tiny"))  # what OUT/config.yaml holds
    assert "  timeout_s: 600.0\n" in saved
    (tmp_path / "old.yaml").write_text(saved.replace("  timeout_s: 600.0\n", ""))  # one written before the key
    assert C.load_yaml(tmp_path / "old.yaml") == C.preset("tiny")


def test_data_max_image_bytes_overrides_saves_and_defaults_in_older_files(tmp_path):
    assert C.preset("tiny").data.max_image_bytes == 512 * 2**20
    assert C.validate(C.apply_overrides(C.preset("tiny"), ["data.max_image_bytes=1000"])).data.max_image_bytes == 1000
    assert C.validate(C.apply_overrides(C.preset("tiny"), ["data.max_image_bytes=0"])).data.max_image_bytes == 0
    with pytest.raises(C.ConfigError, match=r"'data.max_image_bytes' must be an integer >= 0 \(bytes; 0 = no limit\), "
                                            r"got -1"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.max_image_bytes=-1"]))
    with pytest.raises(C.ConfigError, match=r"'data.max_image_bytes' expects an integer, got '64MiB'"):
        C.apply_overrides(C.preset("tiny"), ["data.max_image_bytes=64MiB"])
    saved = C.dumps(C.preset("tiny"))
    assert "  max_image_bytes: 536870912\n" in saved
    (tmp_path / "old.yaml").write_text(saved.replace("  max_image_bytes: 536870912\n", ""))  # written before the key
    assert C.load_yaml(tmp_path / "old.yaml") == C.preset("tiny")


def test_data_index_workers_overrides_saves_and_defaults_in_older_files(tmp_path):
    assert C.preset("tiny").data.index_workers == 0  # automatic
    assert C.validate(C.apply_overrides(C.preset("tiny"), ["data.index_workers=1"])).data.index_workers == 1
    with pytest.raises(C.ConfigError, match=r"'data.index_workers' must be an integer >= 0 \(0 = automatic, 1 = no "
                                            r"worker processes\), got -2"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.index_workers=-2"]))
    saved = C.dumps(C.preset("tiny"))
    assert "  index_workers: 0\n" in saved
    (tmp_path / "old.yaml").write_text(saved.replace("  index_workers: 0\n", ""))  # one written before the key
    assert C.load_yaml(tmp_path / "old.yaml") == C.preset("tiny")


def test_data_synthetic_keys_override_validate_and_default_in_older_files(tmp_path):
    d = C.preset("tiny").data
    assert (d.synthetic_count, d.synthetic_size) == (1_281_167, "256")  # ImageNet-1k's count, 256 x 256
    cfg = C.validate(C.apply_overrides(C.preset("tiny"), ["data.source=synthetic", "data.synthetic_count=100",
                                                          "data.synthetic_size=240x320"]))
    assert (cfg.data.source, cfg.data.synthetic_count, cfg.data.synthetic_size) == ("synthetic", 100, "240x320")
    assert C.apply_overrides(C.preset("tiny"), ["data.synthetic_size=96"]).data.synthetic_size == "96"
    (tmp_path / "s.yaml").write_text("preset: tiny\ndata:\n  source: synthetic\n  synthetic_size: 64\n")
    assert C.load_yaml(tmp_path / "s.yaml").data.synthetic_size == "64"  # a YAML number, taken as its text
    with pytest.raises(C.ConfigError, match=r"'data.synthetic_size': expected a side 'S' or 'HxW' .*got '2.5'"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.synthetic_size=2.5"]))
    with pytest.raises(C.ConfigError, match=r"'data.synthetic_count' must be at least data.batch_size=8 .*got 5"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.source=synthetic", "data.synthetic_count=5"]))
    with pytest.raises(C.ConfigError, match=r"'data.synthetic_size' must be at most data.max_image_pixels=10000 "):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.source=synthetic", "data.max_image_pixels=10000"]))
    # unused (another source): only their form counts, not the limits of a run that reads files
    C.validate(C.apply_overrides(C.preset("tiny"), ["data.synthetic_count=5", "data.max_image_pixels=10000"]))
    with pytest.raises(C.ConfigError, match="'data.synthetic_count' expects an integer"):
        C.apply_overrides(C.preset("tiny"), ["data.synthetic_count=many"])
    saved = C.dumps(C.preset("tiny"))
    assert "  synthetic_count: 1281167\n  synthetic_size: '256'\n" in saved
    (tmp_path / "old.yaml").write_text(saved.replace("  synthetic_count: 1281167\n  synthetic_size: '256'\n", ""))
    assert C.load_yaml(tmp_path / "old.yaml") == C.preset("tiny")  # one written before the keys


def test_data_exclude_must_be_a_readable_file_for_a_source_of_files(tmp_path):
    assert C.preset("tiny").data.exclude == ""  # off
    ex = tmp_path / "dups.tsv"
    ex.write_text("")
    base = C.apply_overrides(C.preset("tiny"), [f"data.source={tmp_path}"])
    assert C.validate(C.apply_overrides(base, [f"data.exclude={ex}"])).data.exclude == str(ex)
    for value, what in ((tmp_path / "gone.txt", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(C.ConfigError, match=rf"'data.exclude' must be a readable text file .* which {what}"):
            C.validate(C.apply_overrides(base, [f"data.exclude={value}"]))
    with pytest.raises(C.ConfigError, match="to resume a run made with it, put it back or write it again"):
        C.validate(C.apply_overrides(base, [f"data.exclude={tmp_path / 'gone.txt'}"]))
    for source in ("digits", "synthetic"):
        with pytest.raises(C.ConfigError, match=rf"'data.exclude' leaves out images of files; data.source "
                                                rf"'{source}' is a built-in set"):
            C.validate(C.apply_overrides(C.preset("tiny"), [f"data.source={source}", f"data.exclude={ex}"]))
    saved = C.dumps(C.preset("tiny"))
    assert "  exclude: ''\n" in saved
    (tmp_path / "old.yaml").write_text(saved.replace("  exclude: ''\n", ""))  # one written before the key
    assert C.load_yaml(tmp_path / "old.yaml") == C.preset("tiny")


def test_yaml_file_starting_from_a_preset(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\ntrain:\n  max_steps: 9\ndata:\n  crops:\n    local_count: 0\n")
    cfg = C.load_yaml(tmp_path / "run.yaml")
    assert cfg.train.max_steps == 9 and cfg.data.crops.local_count == 0
    assert cfg.model == C.preset("tiny").model
    (tmp_path / "bad.yaml").write_text("train:\n  max_stepz: 9\n")
    with pytest.raises(C.ConfigError, match="train.max_steps"):
        C.load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(C.ConfigError, match="unknown preset 'tinny'.*did you mean 'tiny'"):
        C.preset("tinny")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(C.ConfigError, match="'.*binary.yaml' is not UTF-8 text .byte 0"):
        C.load_yaml(tmp_path / "binary.yaml")


def test_yaml_file_string_keys_are_taken_as_written(tmp_path):
    # As with --set: YAML 1.1 would make the folder 010 the number 8, and 'no' false ('off').
    (tmp_path / "run.yaml").write_text("preset: tiny\ndata: {source: 010}\ncheckpoint: {resume: no, dir: 1e3}\n"
                                       "logging: {progress: off}\ntrain: {max_steps: 0x10, grad_clip: 1e-1, "
                                       "threads: 2}\neval: {knn_temperature: 7, dataset: 2024-01-15}\n"
                                       "model: {qk_norm: yes}\n")
    cfg = C.load_yaml(tmp_path / "run.yaml")
    assert (cfg.data.source, cfg.checkpoint.resume, cfg.checkpoint.dir, cfg.logging.progress) == \
        ("010", "no", "1e3", "off")
    assert (cfg.train.max_steps, cfg.train.grad_clip, cfg.train.threads, cfg.eval.knn_temperature) == (16, 0.1, 2, 7.0)
    assert cfg.model.qk_norm is True and cfg.eval.dataset == "2024-01-15"  # a date-named folder
    (tmp_path / "false.yaml").write_text("false\n")
    assert C.load_yaml(tmp_path / "false.yaml") == C.RunConfig()  # as an empty file
    with pytest.raises(C.ConfigError, match=r"config key 'data.crops' \(global|data.crops \(global_\*/local_\*"):
        C.validate(C.apply_overrides(C.preset("tiny"), ["data.crops.global_size=100000", "model.img_size=100000"]))
    assert C.load_yaml(tmp_path / "run.yaml") == cfg and C.from_dict(C.to_dict(cfg)) == cfg  # round trip


def test_numbers_with_a_leading_zero_are_decimal(tmp_path):
    """YAML 1.1 (PyYAML) reads '010' as octal 8: a seed or step count written with a leading zero means 10."""
    cfg = C.apply_overrides(C.preset("tiny"), ["train.seed=010", "train.max_steps=0x10", "optim.lr=010",
                                               "train.threads=-02", "data.num_workers=0"])
    assert (cfg.train.seed, cfg.train.max_steps, cfg.optim.lr, cfg.train.threads, cfg.data.num_workers) == \
        (10, 16, 10.0, -2, 0)
    (tmp_path / "run.yaml").write_text("preset: tiny\ntrain: {seed: 010, max_steps: 0_100}\n")
    cfg = C.load_yaml(tmp_path / "run.yaml")
    assert (cfg.train.seed, cfg.train.max_steps) == (10, 100)


def test_numbers_with_a_leading_zero_are_decimal_in_a_list_or_section_given_with_set(tmp_path):
    """--set read '010' as 10 only as the whole value: in a list or a section it was YAML 1.1's octal 8, where
    the same text in a YAML file gives 10."""
    sets = ["eval.linear_weight_decays=[010, 1]", "train={seed: 010}", "train.max_steps=010 # steps"]
    cfg = C.apply_overrides(C.preset("tiny"), sets)
    assert (cfg.eval.linear_weight_decays, cfg.train.seed, cfg.train.max_steps) == ([10.0, 1.0], 10, 10)
    (tmp_path / "run.yaml").write_text("preset: tiny\neval: {linear_weight_decays: [010, 1]}\ntrain: {seed: 010}\n")
    from_file = C.load_yaml(tmp_path / "run.yaml")
    assert (from_file.eval.linear_weight_decays, from_file.train.seed) == ([10.0, 1.0], 10)


@pytest.mark.parametrize("overrides, ok", [
    (["data.batch_size=3", "data.crops.local_count=1"], False),  # 3 local crops per rank over 2 ranks
    (["data.batch_size=3", "data.crops.local_count=2"], True),   # 6 and 6
    (["data.batch_size=3", "data.crops.local_count=1", "parallel.sequence_parallel=false"], True),
    # crops of one size go through the trunk together: 2 + 2 crops of 32 px x 1 image split 4 ways
    (["parallel.tp=4", "data.batch_size=1", "data.crops.local_size=32"], True),
    (["parallel.tp=4", "data.batch_size=1"], False),
])
def test_sequence_parallel_batch_is_checked_before_the_run(overrides, ok):
    # The trunk splits each resolution group's sequences over the tensor-parallel ranks: a remainder was refused
    # only by the first training step, after the data index and the model were built.
    cfg = C.apply_overrides(C.preset("tiny"), ["parallel.tp=2", "parallel.sequence_parallel=true", *overrides])
    if ok:
        C.validate(cfg)
        return
    with pytest.raises(C.ConfigError, match=r"'data.batch_size' must make the 2 crops of 32 px a multiple of "
                                            r"parallel.tp=4 .* got 1 \(2 sequences\): use a multiple of 2|"
                                            r"'data.batch_size' must make the 1 crops of 16 px a multiple of "
                                            r"parallel.tp=2 .* got 3 \(3 sequences\): use a multiple of 2"):
        C.validate(cfg)
