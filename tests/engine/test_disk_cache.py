"""The prefix cache's disk tier on the tiny V3 checkpoint: evicted blocks come back from disk with the same greedy
output as recomputing them, across restarts, never for another model or setting, never from a bad file; the
directory stays under its limit; no block leaks."""
import subprocess
import sys

import pytest
import torch

from dsinfer import LLM, SamplingParams
from dsinfer.engine.disk_cache import SUFFIX, BadBlockFile, DiskTier, decode_block, encode_block, model_key
from dsinfer.engine.kv_cache import bytes_per_token
from dsinfer.engine.sequence import block_digest
from dsinfer.models.loader import read_config
from dsinfer.server.metrics import EngineCollector
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
PROMPT_LEN = 100  # six full blocks of 16 may come from a cache (the block of the last token never does)


def engine_llm(ckpts, directory=None, kv="float32", blocks=8, model="v3", **options):
    """An LLM whose cache holds `blocks` blocks (8: one max_model_len sequence). A 100-token prompt and its 8
    outputs take 7, so two more such prompts evict every block of the first."""
    per_block = 16 * bytes_per_token(read_config(ckpts[model]), kv)
    return LLM(ckpts[model], max_model_len=128, kv_cache_dtype=kv, kv_cache_memory=blocks * per_block,
               prefix_cache_dir=directory, **options)


def prompts(n=3, seed=0):
    return [{"prompt_token_ids": p} for p in random_prompts([PROMPT_LEN] * n, seed=seed)]


def run(llm, prompt):
    """(token ids, each token's logprob) of one greedy request."""
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    return out.token_ids, [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


def assert_same(a, b, tolerance=0.0):
    assert a[0] == b[0]
    assert max(abs(x - y) for x, y in zip(a[1], b[1])) <= tolerance


def block_files(llm):
    return sorted(llm.engine.disk_tier.directory.glob("*.kvb"))


@pytest.fixture(scope="module")
def reference(ckpts):
    """check(out, prompt, kv, whole_prefix_cached=True): out must equal, bit for bit, the prompt's output with its
    prefix served from the in-memory cache (the same computation on the same row bytes), and match its output
    computed from scratch: the same tokens, logprobs within 1e-4. Not 1e-5: a cached prefix and a full prefill
    sum in different orders, and the in-memory cache alone already differs from a full prefill by up to 2e-5 on
    these prompts (chunked prefill too)."""
    memo = {}

    def outputs(prompt, kv):
        key = (tuple(prompt["prompt_token_ids"]), kv)
        if key not in memo:
            in_memory = engine_llm(ckpts, kv=kv, blocks=16)
            run(in_memory, prompt)
            memo[key] = run(in_memory, prompt), run(engine_llm(ckpts, kv=kv, enable_prefix_caching=False), prompt)
        return memo[key]

    def check(out, prompt, kv="float32", whole_prefix_cached=True):
        in_memory, scratch = outputs(prompt, kv)
        if whole_prefix_cached:
            assert_same(out, in_memory)
        assert_same(out, scratch, 1e-4)
    return check


@pytest.mark.parametrize("kv", ["float32", "fp8"])
def test_an_evicted_prefix_comes_back_from_disk_with_the_same_output(ckpts, tmp_path, reference, kv):
    llm = engine_llm(ckpts, tmp_path, kv)
    a, b, c = prompts(3)
    first = run(llm, a)
    run(llm, b), run(llm, c)  # take the blocks a's prefix was cached in: a's six full blocks are spilled
    llm.engine.disk_tier.flush()
    assert all(llm.engine.disk_tier.files.path(d).is_file() for d in digest_chain(a))
    assert not any(llm.engine.blocks.hash_to_block.get(d) for d in digest_chain(a))
    before = llm.engine.stats()
    again = run(llm, a)
    stats = llm.engine.stats()
    assert stats.disk_hit_blocks - before.disk_hit_blocks == 6 and stats.disk_load_seconds_mean > 0
    assert stats.prompt_tokens_computed - before.prompt_tokens_computed == PROMPT_LEN - 6 * 16
    assert again[0] == first[0]
    reference(again, a, kv)
    assert stats.kv_blocks_used == 0


def test_a_restart_reuses_the_blocks(ckpts, tmp_path, reference):
    old = engine_llm(ckpts, tmp_path)
    for p in prompts(3):
        run(old, p)
    old.engine.close()  # writes what is still cached in memory, too
    new = engine_llm(ckpts, tmp_path)
    assert new.engine.stats().disk_blocks == 3 * 6
    for p in prompts(3):
        before = new.engine.stats().disk_hit_blocks
        reference(run(new, p), p)
        assert new.engine.stats().disk_hit_blocks - before == 6
    assert new.engine.stats().kv_blocks_used == 0


def test_another_model_or_setting_never_reuses_the_files(ckpts, tmp_path):
    first = engine_llm(ckpts, tmp_path)
    run(first, prompts(1)[0])
    first.engine.close()
    for other in (engine_llm(ckpts, tmp_path, "fp8"), engine_llm(ckpts, tmp_path, "bfloat16"),
                  engine_llm(ckpts, tmp_path, model="v2"), engine_llm(ckpts, tmp_path, quantization="int8")):
        assert other.engine.disk_tier.directory != first.engine.disk_tier.directory
        run(other, prompts(1)[0])
        stats = other.engine.stats()
        assert stats.disk_hit_blocks == 0 and stats.memory_hit_blocks == 0
    assert len(block_files(first)) == 6


def test_bad_files_are_deleted_and_recomputed(ckpts, tmp_path, reference):
    old = engine_llm(ckpts, tmp_path)
    ps = prompts(3, seed=5)
    digests = [digest_chain(p) for p in ps]
    for p in ps:
        run(old, p)
    old.engine.close()
    tier = old.engine.disk_tier
    truncated, flipped, other = (tier.files.path(d[i]) for d, i in zip(digests, (0, 2, 4)))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    rows = decode_block(other.read_bytes(), ps[2]["prompt_token_ids"][64:80], tier.layout)
    other.write_bytes(encode_block(list(range(16)), rows))  # a sound file under the name, for other tokens
    new = engine_llm(ckpts, tmp_path)
    for p, bad_at, path in zip(ps, (0, 2, 4), (truncated, flipped, other)):
        before = new.engine.stats().disk_hit_blocks
        reference(run(new, p), p, whole_prefix_cached=False)  # computed from the bad block on
        assert new.engine.stats().disk_hit_blocks - before == bad_at and not path.exists()
    stats = new.engine.stats()
    assert stats.disk_discarded_blocks == 3 and stats.kv_blocks_used == 0


def digest_chain(prompt, block_size=16):
    ids, digests = prompt["prompt_token_ids"], [b""]
    for i in range(len(ids) // block_size):
        digests.append(block_digest(digests[-1], ids[i * block_size:(i + 1) * block_size]))
    return digests[1:]


def test_the_directory_stays_under_its_limit(ckpts, tmp_path, reference):
    file_bytes = len(encode_block([0] * 16, [torch.zeros(16, 48)] * 4))
    llm = engine_llm(ckpts, tmp_path, prefix_cache_dir_bytes=10 * file_bytes)
    ps = prompts(5, seed=9)
    for p in ps:
        run(llm, p)
    llm.engine.close()
    files = block_files(llm)
    stats = llm.engine.stats()
    assert len(files) == 10 and sum(f.stat().st_size for f in files) == stats.disk_bytes <= 10 * file_bytes
    assert stats.disk_stored_blocks >= 5 * 6 and stats.disk_evicted_blocks == stats.disk_stored_blocks - 10
    new = engine_llm(ckpts, tmp_path)
    reference(run(new, ps[-1]), ps[-1])
    assert new.engine.stats().disk_hit_blocks == 6  # the most recently written blocks are the ones kept


def test_digests_and_model_keys_are_the_same_in_another_process(ckpts):
    code = ("import sys; from pathlib import Path; from dsinfer.engine.sequence import block_digest; "
            "from dsinfer.engine.disk_cache import model_key; "
            "print(block_digest(block_digest(b'', [1, 2, 3]), [4, 5]).hex(), model_key(Path(sys.argv[1]), {'a': 1}))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpts["v3"])], capture_output=True, text=True, check=True)
    here = f"{block_digest(block_digest(b'', [1, 2, 3]), [4, 5]).hex()} {model_key(ckpts['v3'], {'a': 1})}"
    assert out.stdout.split() == here.split()


def test_block_files_round_trip_and_reject_what_does_not_match():
    layout = [(torch.bfloat16, (4, 6)), (torch.uint8, (4, 10))]
    rows = [torch.randn(4, 6).bfloat16(), torch.randint(0, 255, (4, 10), dtype=torch.uint8)]
    data = encode_block([5, 6, 7, 8], rows)
    assert all(torch.equal(a, b) for a, b in zip(decode_block(data, (5, 6, 7, 8), layout), rows))
    for bad, message in [(data[:-1], "checksum"), (data[:10], "checksum"),
                         (data[:40] + bytes([data[40] ^ 1]) + data[41:], "checksum")]:
        with pytest.raises(BadBlockFile, match=message):
            decode_block(bad, (5, 6, 7, 8), layout)
    with pytest.raises(BadBlockFile, match="other token ids"):
        decode_block(data, (5, 6, 7, 9), layout)
    with pytest.raises(BadBlockFile, match="expected torch.float32"):
        decode_block(data, (5, 6, 7, 8), [(torch.float32, (4, 6)), layout[1]])


def test_a_full_queue_drops_blocks_instead_of_waiting(tmp_path):
    tier = DiskTier(tmp_path, None, [(torch.float32, (2, 3))], queue_blocks=1)
    with tier.files.lock:  # the writer cannot finish a block meanwhile
        for i in range(3):
            tier.spill(bytes([i]) * 16, (1, 2), [torch.full((2, 3), float(i))])
        assert tier.stats().dropped_blocks >= 1
    tier.flush()
    stats = tier.stats()
    assert stats.stored_blocks + stats.dropped_blocks == 3 and stats.blocks == stats.stored_blocks
    tier.close()
    tier.spill(b"x" * 16, (1, 2), [torch.zeros(2, 3)])  # closed: ignored
    assert not tier.has(b"x" * 16)


def test_exit_with_writes_queued_neither_hangs_nor_leaves_half_a_file(tmp_path):
    code = ("import sys, torch; from pathlib import Path; from dsinfer.engine.disk_cache import DiskTier\n"
            "tier = DiskTier(Path(sys.argv[1]), None, [(torch.float32, (256, 1024))])\n"
            "for i in range(40): tier.spill(bytes([i]) * 16, tuple(range(256)), [torch.full((256, 1024), i * 1.0)])\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    tier = DiskTier(tmp_path, None, [(torch.float32, (256, 1024))])
    for i in range(40):
        rows = tier.fetch(bytes([i]) * 16, tuple(range(256)))
        assert rows is None or torch.equal(rows[0], torch.full((256, 1024), i * 1.0))
    assert tier.stats().discarded_blocks == 0


def test_bad_options_get_clear_errors(ckpts, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="prefix_cache_dir: cannot create"):
        engine_llm(ckpts, tmp_path / "file" / "sub")
    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        engine_llm(ckpts, tmp_path, enable_prefix_caching=False)


def test_stats_and_metrics_show_both_tiers(ckpts, tmp_path):
    llm = engine_llm(ckpts, tmp_path)
    a, b, c = prompts(3)
    run(llm, a), run(llm, b), run(llm, c)
    llm.engine.disk_tier.flush()
    run(llm, a)
    llm.engine.disk_tier.flush()
    stats = llm.engine.stats()
    assert stats.disk_enabled and stats.disk_blocks == stats.disk_stored_blocks >= 6 + 5
    assert stats.disk_bytes > 0 and stats.disk_store_seconds_mean > 0 and stats.disk_hit_blocks == 6
    assert stats.memory_miss_blocks == 4 * 6 and stats.disk_miss_blocks == 3 * 6

    class Async:
        def stats(self):
            return llm.engine.stats()

    class Counts:
        hits = misses = 0

    families = {m.name: m for m in EngineCollector(Async(), Counts()).collect()}
    hits = {s.labels["tier"]: s.value for s in families["dsinfer_prefix_cache_hit_blocks"].samples}
    assert hits == {"memory": 0, "disk": 6}
    assert families["dsinfer_prefix_cache_disk_bytes"].samples[0].value == stats.disk_bytes
    for name in ("prefix_cache_miss_blocks", "prefix_cache_disk_blocks", "prefix_cache_disk_stored_blocks",
                 "prefix_cache_disk_store_seconds_mean", "prefix_cache_disk_load_seconds_mean"):
        assert f"dsinfer_{name}" in families


def test_leaving_a_with_block_writes_what_memory_still_holds(ckpts, tmp_path):
    with LLM(ckpts["v3"], prefix_cache_dir=tmp_path, max_model_len=256) as llm:
        run(llm, prompts(1)[0])
        assert llm.engine.stats().disk_blocks == 0  # nothing evicted yet
        tier = llm.engine.disk_tier
    assert len(list(tier.directory.glob("*" + SUFFIX))) == 6  # the prompt's full blocks, written on the way out
