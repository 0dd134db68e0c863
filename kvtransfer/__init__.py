"""pdserve.kvtransfer: moves one request's KV cache from a prefill worker into a decode worker's blocks.

types.py (torch-free: KVHandle, TransferStatus) · protocols.py (KVCodec, Transport) · codecs.py +
codec_*.py + quant.py (raw, int8, fp8, int4, int4_zstd) · wire.py + kvtransfer.proto (frames, chunks,
crc32) · transport_{loopback,grpc,torch}.py · sender.py / receiver.py / connector.py (the composites
and their factories) · reshard.py (TP/PP intersection) · controller.py (codec=auto).
Import submodules directly; this file stays empty so the router can import types without torch.
"""
