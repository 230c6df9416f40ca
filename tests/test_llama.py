"""The torch engine's Llama against transformers' LlamaForCausalLM on the same weights."""

import pytest
import torch
from transformers import LlamaForCausalLM

from orpheus_triton.demo_models import write_random_llama
from orpheus_triton.llama import LlamaConfig, load_llama, rope_frequencies

SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 160}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_random_llama(path, SHAPE, seed=3, tie_word_embeddings=request.param)
    return path


def hf_logits(path, rows):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([r])).logits[0] for r in rows]


@pytest.mark.parametrize("varlen", [False, True], ids=["masked", "per-row-keys"])
def test_prefill_and_batched_decode_match_transformers(checkpoint, varlen, request):
    """Rows of different lengths in one decode step; with ``varlen`` each row reads only its own keys
    (the GPU's FlashAttention varlen call, answered here by a reference of what it computes)."""
    torch.manual_seed(0)
    rows = [torch.randint(0, 156940, (n,)).tolist() for n in (11, 4, 7)]
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=4, max_seq_len=64)
    if varlen:
        request.getfixturevalue("flash_reference")
        assert model.use_varlen_decode(True)
    with torch.inference_mode():
        # Prefill each row into its slot (rows of different lengths) ...
        prefill = [model(torch.tensor([r]), torch.arange(len(r))[None], first_slot=i, last_only=False)[0]
                   for i, r in enumerate(rows)]
        # ... then one batched decode step over all three rows at their own positions.
        nxt = [5, 6, 7]
        decode = model(torch.tensor([[t] for t in nxt]), torch.tensor([[len(r)] for r in rows]), first_slot=0)
    expected = hf_logits(checkpoint, rows)
    extended = hf_logits(checkpoint, [r + [t] for r, t in zip(rows, nxt, strict=True)])
    for got, want in zip(prefill, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for i, want in enumerate(extended):
        torch.testing.assert_close(decode[i], want[-1], rtol=1e-4, atol=1e-4)


def test_loaded_weights_record_no_autograd_history(checkpoint):
    """A forward outside inference mode (a CUDA graph captured at load) builds no autograd graph."""
    model = load_llama(checkpoint)
    assert not any(p.requires_grad for p in model.parameters())
    model.allocate_cache(num_slots=2, max_seq_len=16)
    out = model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], hidden_only=True)
    assert out.grad_fn is None and not out.requires_grad


def test_chunked_prefill_equals_whole_prefill(checkpoint):
    row = torch.randint(0, 156940, (20,)).tolist()
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=2, max_seq_len=64)
    with torch.inference_mode():
        whole = model(torch.tensor([row]), torch.arange(20)[None], first_slot=0)
        model(torch.tensor([row[:8]]), torch.arange(8)[None], first_slot=1)
        chunked = model(torch.tensor([row[8:]]), torch.arange(8, 20)[None], first_slot=1)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from orpheus_triton.demo_models import llama_config

    hf = llama_config({"hidden_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 24,
                       "num_key_value_heads": 8, "intermediate_size": 8192})
    ours = rope_frequencies(LlamaConfig.from_hf(hf))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](HFConfig(**hf), "cpu")
    torch.testing.assert_close(ours, theirs)


def test_a_config_saved_by_transformers_5_keeps_its_llama3_rope(tmp_path):
    """transformers 5 writes rope_theta and the Llama-3 scaling inside rope_parameters only; read the old
    way, a fine-tune it saved loaded with theta 10,000 and no scaling."""
    import json

    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from orpheus_triton.demo_models import llama_config

    hf = llama_config(SHAPE)
    HFConfig(**hf).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("rope_theta", None), saved.pop("rope_scaling", None)  # the new layout, whichever writes it
    saved["rope_parameters"] = {"rope_theta": hf["rope_theta"], **hf["rope_scaling"]}
    config = LlamaConfig.from_hf(saved)
    assert config.rope_theta == 500_000.0 and config.rope_scaling["rope_type"] == "llama3"
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](HFConfig(**hf), "cpu")
    torch.testing.assert_close(rope_frequencies(config), theirs)
    plain = LlamaConfig.from_hf({**saved, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert (plain.rope_theta, plain.rope_scaling) == (1e4, None)


@pytest.mark.parametrize(("field", "value"), [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu")])
def test_a_llama_variant_this_model_does_not_compute_is_refused(field, value):
    from orpheus_triton.demo_models import llama_config

    with pytest.raises(ValueError, match=f"config.json has {field}"):
        LlamaConfig.from_hf({**llama_config(SHAPE), field: value})


def test_weights_that_do_not_fit_the_model_are_refused_not_dropped(tmp_path):
    """An untied checkpoint without its head, a tensor the model has no place for, weights of another
    size: each would have loaded as a different model."""
    import json

    from safetensors.torch import load_file, save_file

    write_random_llama(tmp_path, SHAPE, seed=3, tie_word_embeddings=False)
    (weights,) = tmp_path.glob("*.safetensors")
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, weights)
    with pytest.raises(ValueError, match=r"lacks \['lm_head.weight'\]"):
        load_llama(tmp_path)
    save_file(state | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights)
    with pytest.raises(ValueError, match=r"tensors this Llama does not use: \['layers.0.self_attn.q_proj.bias'\]"):
        load_llama(tmp_path)
    save_file(state | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}, weights)
    load_llama(tmp_path)  # old checkpoints keep these; they are recomputed
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    with pytest.raises(ValueError, match="does not match its config.json"):
        load_llama(tmp_path)


def test_a_sharded_checkpoint_reads_the_files_its_index_names(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    write_random_llama(tmp_path, SHAPE, seed=3)
    reference = load_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "model.safetensors")  # stale
    loaded = load_llama(tmp_path)
    torch.testing.assert_close(loaded.embed_tokens.weight, reference.embed_tokens.weight)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_llama(tmp_path)


def test_bad_checkpoint_dirs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ValueError, match="not 'llama'"):
        load_llama(tmp_path)


def test_a_checkpoint_missing_a_projection_names_it(tmp_path):
    """The fused q/k/v matrix is built from the checkpoint's three: a missing one is named as the
    checkpoint names it, not as the fused matrix."""
    from safetensors.torch import load_file, save_file

    write_random_llama(tmp_path, SHAPE, seed=3)
    (weights,) = tmp_path.glob("*.safetensors")
    state = load_file(weights)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"lacks \['layers.1.self_attn.k_proj.weight'\]"):
        load_llama(tmp_path)


def test_batch_buckets_are_powers_of_two_then_multiples_of_the_step(checkpoint):
    from orpheus_triton.llama import BucketedDecoder

    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=257, max_seq_len=64)  # 256 decode slots + scratch
    decoder = BucketedDecoder(model, context_step=16, use_graphs=False)
    assert decoder.batch_buckets == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
    assert decoder.bucket(216, 40) == (224, 48)  # 216 streams run as 224 rows, not 256
    assert BucketedDecoder(model, batch_step=8, use_graphs=False).batch_buckets[:6] == [1, 2, 4, 8, 16, 24]


def test_bucketed_decode_step_equals_the_plain_step(checkpoint):
    """The GPU decode path (padded to bucket shapes) computes the same as the exact-shape step.

    CUDA graph capture itself needs a GPU; the padding and bucketing logic run here eagerly.
    """
    from orpheus_triton.llama import BucketedDecoder

    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=7, max_seq_len=64)  # 6 decode slots + scratch
    decoder = BucketedDecoder(model, context_step=16, use_graphs=False)
    assert decoder.batch_buckets == [1, 2, 4, 6]
    assert decoder.bucket(3, 17) == (4, 32) and decoder.bucket(6, 64) == (6, 64)
    # capture_all (a server's startup) covers every shape a step can take, and only those.
    reachable = {decoder.bucket(batch, length) for batch in range(1, 7) for length in range(1, 65)}
    assert set(decoder.shapes()) == reachable and len(decoder.shapes()) == len(reachable)
    assert decoder.capture_all() == 0  # nothing to capture without CUDA graphs
    rows = [torch.randint(0, 156940, (n,)).tolist() for n in (9, 3, 12)]
    with torch.inference_mode():
        for i, r in enumerate(rows):
            model(torch.tensor([r]), torch.arange(len(r))[None], first_slot=i)
        tokens = torch.tensor([[1], [2], [3]])
        positions = torch.tensor([[len(r)] for r in rows])
        plain = model(tokens, positions, first_slot=0, context_len=13, hidden_only=True)
        bucketed = decoder(tokens, positions, context_len=13)
    assert bucketed.shape == plain.shape
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-5)


def test_per_row_decode_attention_is_used_only_where_it_agrees_with_the_masked_path(monkeypatch, flash_reference):
    from flash_reference import flash_attention_forward

    from orpheus_triton import llama

    cpu = torch.device("cpu")
    assert not llama.varlen_decode_works(cpu, torch.float32, 4, 2, 16)  # CUDA and half precision only
    assert llama._agrees_with_masked(cpu, torch.float32, 4, 2, 16)  # the check itself, on the reference

    def missing(*args, **kwargs):
        raise RuntimeError("seqused_k is not supported")

    monkeypatch.setattr(llama, "_flash_attention", missing)
    assert not llama._agrees_with_masked(cpu, torch.float32, 4, 2, 16)

    def off_by_one(q, k, v, cum_q, cum_k, *args, seqused_k=None, **kwargs):
        return flash_attention_forward(q, k, v, cum_q, cum_k, *args, seqused_k=seqused_k - 1, **kwargs)

    monkeypatch.setattr(llama, "_flash_attention", off_by_one)
    assert not llama._agrees_with_masked(cpu, torch.float32, 4, 2, 16)


def test_the_kv_cache_is_one_tensor_and_a_slot_moves_in_one_copy(checkpoint):
    """Every layer's keys and values are views of one tensor, so moving a slot (at every stream's end) is one
    copy, not two per layer; it moves that slot's first positions in every layer and touches nothing else."""
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=3, max_seq_len=16)
    cache = model.kv_cache
    assert cache.shape == (len(model.layers), 2, 3, 16, model.config.num_kv_heads, model.config.head_dim)
    for index, layer in enumerate(model.layers):
        assert layer.self_attn.k_cache.data_ptr() == cache[index, 0].data_ptr()
        assert layer.self_attn.v_cache.data_ptr() == cache[index, 1].data_ptr()
    cache.copy_(torch.randn(cache.shape))
    before = cache.clone()
    model.copy_slot(2, 0, 5)
    for layer in model.layers:
        for keys_or_values in (layer.self_attn.k_cache, layer.self_attn.v_cache):
            assert torch.equal(keys_or_values[0, :5], keys_or_values[2, :5])
    assert torch.equal(cache[:, :, 0, 5:], before[:, :, 0, 5:])
    assert torch.equal(cache[:, :, 1:], before[:, :, 1:])


def prefill_rows(count: int = 3) -> list[list[int]]:
    return [torch.randint(0, 156940, (n,)).tolist() for n in (9, 3, 12)[:count]]


def test_bucketed_prefill_equals_the_plain_prefill(checkpoint):
    """Short prompts prefilled at a padded shape into scratch slots (the GPU path, a CUDA graph there; here
    eagerly) give each row's last hidden state and, once moved, the cache entries of the plain prefill."""
    from orpheus_triton.llama import BucketedPrefill

    torch.manual_seed(1)
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=3 + 4, max_seq_len=64)  # 3 decode slots + 4 scratch
    prefill = BucketedPrefill(model, first_slot=3, max_rows=4, max_tokens=64, use_graphs=False)
    assert prefill.rows == [1, 2, 4] and prefill.widths == [16, 32, 64]
    assert prefill.bucket(3, 12) == (4, 16) and prefill.bucket(1, 17) == (1, 32)
    assert prefill.bucket(2, 33) is None  # 2 x 64 positions: over the 64 a prefill takes
    assert prefill.bucket(5, 3) is None and prefill.bucket(1, 65) is None
    assert set(prefill.shapes()) == {(1, 16), (2, 16), (4, 16), (1, 32), (2, 32), (1, 64)}
    assert prefill.capture_all() == 0  # nothing to capture without CUDA graphs
    rows = prefill_rows()
    width = max(map(len, rows))
    tokens = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows])
    last = torch.tensor([len(r) - 1 for r in rows])
    with torch.inference_mode():
        plain = [model(torch.tensor([r]), torch.arange(len(r))[None], first_slot=i, hidden_only=True)[0]
                 for i, r in enumerate(rows)]
        plain_cache = model.kv_cache[:, :, :3].clone()
        model.kv_cache[:, :, :3] = 0
        bucketed = prefill(tokens, last)
        model.copy_slot(3, 0, width, count=3)
    torch.testing.assert_close(bucketed, torch.stack(plain), rtol=1e-5, atol=1e-5)
    for slot, r in enumerate(rows):
        torch.testing.assert_close(model.kv_cache[:, :, slot, : len(r)], plain_cache[:, :, slot, : len(r)],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no prefill bucket for 5 prompts"):
        prefill(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit 7 slots"):
        BucketedPrefill(model, first_slot=4, max_rows=4, max_tokens=64, use_graphs=False)


def two_padded_prompts(model):
    """Two prompts padded to 12 tokens, each row's last prompt position, and their plain prefills' states."""
    rows = prefill_rows(2)
    tokens = torch.tensor([r + [r[0]] * (12 - len(r)) for r in rows])
    last = torch.tensor([len(r) - 1 for r in rows])
    with torch.inference_mode():
        plain = torch.stack([model(torch.tensor([r]), torch.arange(len(r))[None], hidden_only=True)[0]
                             for r in rows])
    return tokens, last, plain


@pytest.mark.parametrize("fault", ["capture fails", "graph disagrees"])
def test_a_prefill_graph_that_fails_or_disagrees_leaves_prefills_eager(checkpoint, monkeypatch, caplog, fault):
    """Checked when captured (a CUDA graph needs a GPU: the capture is stood in for here): a graph that cannot
    be captured or whose output differs from the eager prefill is not used; that prefill runs eagerly with
    the same result, and no later one is taken (the caller prefills eagerly at the prompts' own shape)."""
    from orpheus_triton import cuda_graphs
    from orpheus_triton.llama import BucketedPrefill

    class Replayed:
        def replay(self):
            pass

    def stand_in(run, device, pool):
        if fault == "capture fails":
            raise RuntimeError("operation not permitted when stream is capturing")
        return Replayed(), torch.zeros_like(run())

    monkeypatch.setattr(cuda_graphs, "capture", stand_in)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)  # (CUDA's; this torch has none)
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=4, max_seq_len=64)
    prefill = BucketedPrefill(model, first_slot=2, max_rows=2, max_tokens=64, use_graphs=True)
    tokens, last, plain = two_padded_prompts(model)
    with torch.inference_mode():
        first = prefill(tokens, last)
    assert not prefill.use_graphs and not prefill.graphs and prefill.bucket(2, 12) is None
    assert "prefilling eagerly" in caplog.text
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)


def test_prefill_graphs_are_checked_on_prompts_of_several_lengths(checkpoint, monkeypatch):
    """At a server's start every shape is captured and checked on random prompts whose last positions differ
    (the mask, the rotary positions and each row's own last state checked): a graph that always answered
    position 0, which zeroed inputs would not tell from a right one, is refused."""
    from orpheus_triton import cuda_graphs
    from orpheus_triton.llama import BucketedPrefill

    class Replayed:
        def replay(self):
            pass

    checked = []

    def position_zero_only(run, device, pool):
        out = run()
        checked.append(prefill.last[: out.shape[0]].tolist())
        first = prefill.model(prefill.tokens[: out.shape[0], :1], torch.zeros(out.shape[0], 1, dtype=torch.long),
                              first_slot=prefill.first_slot, context_len=1, hidden_only=True)
        return Replayed(), first

    monkeypatch.setattr(cuda_graphs, "capture", position_zero_only)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=6, max_seq_len=64)
    prefill = BucketedPrefill(model, first_slot=2, max_rows=4, max_tokens=64, use_graphs=True)
    assert prefill.capture_all() == 0 and prefill.bucket(1, 12) is None
    assert checked == [[8]]  # the first shape (1 x 16) checked at its row's position 8, and refused


def test_a_prefill_with_keys_expanded_to_every_head_equals_the_grouped_one():
    """On a GPU a prefill's keys and values are expanded to every query head (a mask with enable_gqa left
    torch only its math kernel there); the attention is the grouped one's, head for head."""
    from orpheus_triton.llama import _masked_attention

    gen = torch.Generator().manual_seed(0)
    batch, steps, heads, kv_heads, hd, seq = 3, 5, 6, 2, 8, 12
    q = torch.randn(batch, steps, heads, hd, generator=gen)
    k_cache, v_cache = (torch.randn(batch, seq, kv_heads, hd, generator=gen) for _ in range(2))
    positions = torch.tensor([[0], [2], [4]]) + torch.arange(steps)  # rows at different depths
    mask = (torch.arange(10)[None, None, :] <= positions[:, :, None])[:, None]
    grouped = _masked_attention(q, k_cache, v_cache, 10, mask, expand_kv=False)
    expanded = _masked_attention(q, k_cache, v_cache, 10, mask, expand_kv=True)
    torch.testing.assert_close(expanded, grouped)
    # and what each query head reads is its own KV head's: head h of the grouped call uses KV head h // 3
    alone = _masked_attention(q[:, :, 3:6], k_cache[:, :, 1:2], v_cache[:, :, 1:2], 10, mask, expand_kv=True)
    torch.testing.assert_close(alone, grouped[:, :, 3:6])


def test_a_prefill_graph_is_replayed_once_on_first_use_and_a_refusal_keeps_none(checkpoint, monkeypatch):
    """A graph captured on first use was replayed twice (its check replays it on those very inputs); and
    capture_all counted the graphs captured before one was refused, which are dropped with it."""
    from orpheus_triton import cuda_graphs
    from orpheus_triton.llama import BucketedPrefill

    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    captures = []

    def stand_in(run, device, pool):
        captures.append(1)
        if refuse_at and len(captures) == refuse_at:
            raise RuntimeError("operation not permitted when stream is capturing")
        return Graph(), run()

    monkeypatch.setattr(cuda_graphs, "capture", stand_in)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = load_llama(checkpoint)
    model.allocate_cache(num_slots=6, max_seq_len=64)
    refuse_at = 0
    prefill = BucketedPrefill(model, first_slot=2, max_rows=2, max_tokens=64, use_graphs=True)
    tokens, last, plain = two_padded_prompts(model)
    with torch.inference_mode():
        torch.testing.assert_close(prefill(tokens, last), plain, rtol=1e-5, atol=1e-5)
    assert len(replays) == 1  # the check's replay: not a second one
    refuse_at = 2
    captures.clear()
    refused = BucketedPrefill(model, first_slot=2, max_rows=2, max_tokens=64, use_graphs=True)
    assert refused.capture_all() == 0 and not refused.graphs and len(captures) == 2
