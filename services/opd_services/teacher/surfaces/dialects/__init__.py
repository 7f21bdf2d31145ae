"""Other servers' protocols on the native HTTP port, so existing trainers work unchanged.

vLLM: vllm.py (routes, /v1/completions, /inference/v1/generate) with vllm_chat.py, vllm_tokenize.py and
their shared vllm_core.py (the one Ask into the ScoringService, vLLM's error shape), vllm_logprobs.py
(the logprob shapes) and vllm_text.py (text through text/). SGLang: sglang.py. Each imports
`surfaces.common` (errors, auth, body parsing) and `teacher.text`, never another surface.
"""
