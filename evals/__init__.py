"""GSM8K and MRCR evaluations against the OpenAI-compatible server (installed as vllm_lite.evals)."""
