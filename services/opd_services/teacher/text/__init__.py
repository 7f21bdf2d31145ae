"""Text in one place: the model folder's tokenizer, chat rendering and character offsets.

Every surface (native HTTP and gRPC, the vLLM and SGLang dialects) turns text and chat messages
into token ids here, and renders ids back into text here; no surface carries its own copy.
Engines never see text: what leaves this package for the core is token ids.

  tokenizer.py  load a folder's tokenizer (fast, Rust), its identity, encode with offsets, decode;
                the thread pool that keeps tokenizing off the event loop
  chat.py       chat messages -> the model's own chat template -> text, ids and per-message spans
  sequences.py  a scoring sequence given as text or messages -> ids, score_from and offsets

This package does not score, batch, or know any wire format.
"""
