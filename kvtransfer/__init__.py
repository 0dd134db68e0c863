"""pdserve.kvtransfer: moves one request's KV cache from a prefill worker into a decode worker's blocks.

types.py (torch-free: KVHandle, TransferStatus) · protocols.py (KVCodec, Transport, KVSource, KVSink,
BlockRefs) · codecs.py + codec_*.py + quant.py (raw, int8, fp8, int4, int4_zstd) · wire.py +
kvtransfer.proto (frames, chunks, crc32) · transport_{loopback,grpc,torch}.py (+ pull_transport.py,
torch_*.py) · tensor_transport.py + pair_group.py + ipc.py (the torch transport's tensor lane) ·
sender.py / receiver.py (the composites) · options.py · factories.py (build them from config) ·
reshard.py (TP/PP intersection) · controller.py (codec=auto).
May import pdserve.config and pdserve.engine.kv_cache; never a role, the router or Ray.
Import submodules directly; this file stays empty so the router can import types without torch.
"""
