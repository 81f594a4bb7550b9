"""vllm_lite: a compact, fast LLM inference engine in the spirit of vLLM."""
from vllm_lite.outputs import CompletionOutput, Logprob, RequestOutput
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "__version__"]


def __getattr__(name: str):
    # Importing the engine pulls in torch and transformers; defer it until LLM is asked for.
    if name == "LLM":
        from vllm_lite.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
