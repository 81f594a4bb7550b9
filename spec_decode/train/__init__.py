"""`vllm-lite train-draft`: train an EAGLE-3 draft head for a served model on one device.

data.py generates the target's own greedy responses with the engine and stores, per token, the target's low / mid /
high hidden states and its greedy next token in bounded safetensors shards; vocab.py picks the draft vocabulary;
head.py is the trainable head (training-time test unrolled over the draft steps); trainer.py runs AdamW with a
cosine schedule, checkpoints and resumes; export.py writes the folder that `{"method": "eagle3", "model": DIR}`
loads (spec_decode/eagle.py); cli.py parses the command line.

The package drives the engine (it generates the data with `LLM`), so it sits with the entrypoints in the import
layering, not with the proposers of spec_decode/.
"""
