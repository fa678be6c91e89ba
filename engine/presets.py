"""Model presets: HF-style configs built with random weights (benchmarks, the default app)."""
from __future__ import annotations

_LLAMA2_7B = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)

_LLAMA3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=1, eos_token_id=2,
)

# Shapes of Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-8B and mistralai/Mistral-7B-Instruct-v0.3 (their config.json;
# v0.3 has no sliding window and the 32768 vocab)
_QWEN25_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
    use_sliding_window=False, bos_token_id=151643, eos_token_id=[151645, 151643],
)

_QWEN3_8B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
    use_sliding_window=False, bos_token_id=151643, eos_token_id=[151645, 151643],
)

_MISTRAL_7B = dict(
    model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None,
    bos_token_id=1, eos_token_id=2,
)

_TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)

PRESETS: dict[str, dict] = {"llama-2-7b": _LLAMA2_7B, "llama-3-8b": _LLAMA3_8B, "qwen2.5-7b": _QWEN25_7B,
                             "qwen3-8b": _QWEN3_8B, "mistral-7b": _MISTRAL_7B, "tiny": _TINY}
