"""CacheBlend as a reuse strategy: documents' stored KV anywhere in a prompt, the tokens that deviate most recomputed.

The selection and the layer-wise recompute are `BlendPrefill` (kvcake.reuse.selective);
the document machinery shared with CacheTune is `DocumentReuse` (kvcake.reuse.documents).
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from kvcake.chunk import ChunkKV
from kvcake.model import KVCache
from kvcake.model.segments import PromptLayout
from kvcake.reuse.cake import Waiting
from kvcake.reuse.contract import Filled, ReuseChoice
from kvcake.reuse.documents import DocumentPlan, DocumentReuse, DocumentRows
from kvcake.reuse.layers import LayerSource
from kvcake.reuse.prefetch import PrefixPrefetch
from kvcake.reuse.selective import BlendPrefill


class BlendReuse(DocumentReuse):
    """CacheBlend: the documents' stored KV, with the tokens that deviate most recomputed (the `Reuse` contract)."""

    def plan(self, prompt: PromptLayout, choice: ReuseChoice) -> DocumentPlan:
        """At ratio 1 nothing is read (the full prefill), so no document counts as stored."""
        ratio = self.settings.blend_ratio if choice.ratio is None else choice.ratio
        keys = [self.document_key(choice.tenant, prompt.preamble, ids) for ids in prompt.documents()]
        stored = [ratio < 1.0 and self.store.contains(key) for key in keys]
        return DocumentPlan(prompt, self._plan_prefix(prompt, choice), keys, stored, ratio)

    def fill(self, plan: DocumentPlan, cache: KVCache, prefetched: PrefixPrefetch | None = None) -> Generator[None, None, Filled]:
        """Documents missing from the store are computed in isolation first and queued for write-back."""
        prompt = plan.prompt
        rows = DocumentRows.of(plan)
        source = (yield from self._source(plan)) if plan.ratio < 1.0 else (lambda layer: None)
        settings = self.settings
        blender = BlendPrefill(self.model, plan.ratio, list(settings.check_layers), settings.selection, settings.correction)
        loaded_layers = blender.loaded_layers(len(rows.tokens))
        filled, blend = yield from self._blend(plan, cache, prefetched, blender, source, loaded_layers, rows.tokens, rows.from_store, rows.document_of)
        blend.documents = len(prompt.document_spans)
        blend.documents_stored = sum(plan.stored)
        blend.documents_computed = blend.documents - blend.documents_stored
        return filled

    def store_documents(
        self, documents: list[list[int]], preamble: tuple[int, ...], tenant: str
    ) -> Generator[Waiting | None, None, list[tuple[str, bool]]]:
        """Compute and store the documents not stored yet, pausing after every pass; each one's key
        and whether it was stored before. Entries are written here, not queued, so they are stored
        once this returns (a write-back queue could drop them)."""
        keys = [self.document_key(tenant, preamble, ids) for ids in documents]
        present = yield from self._claim(keys)
        missing = [i for i, stored in enumerate(present) if not stored]
        try:
            for index, chunk in zip(missing, (yield from self.compute([documents[i] for i in missing], preamble))):
                self.store.put(keys[index], chunk)
        finally:
            self.in_flight.release(keys[i] for i in missing)
        return list(zip(keys, present))

    def _source(self, plan: DocumentPlan) -> Generator[None, None, LayerSource]:
        """A layer reader over the prompt's documents, in `DocumentRows` order; the missing ones are computed
        now (pausing after every pass) and queued for write-back."""
        documents = plan.prompt.documents()
        missing = [i for i, present in enumerate(plan.stored) if not present]
        computed = dict(zip(missing, (yield from self.compute([documents[i] for i in missing], plan.prompt.preamble))))
        for index, chunk in computed.items():
            self.writeback.submit(plan.keys[index], chunk)
        entries = [(key, computed.get(index), len(ids)) for index, (key, ids) in enumerate(zip(plan.keys, documents))]

        def read_layer(layer: int) -> tuple[ChunkKV, int] | None:
            layer_keys, layer_values, nbytes = [], [], 0
            for key, chunk, length in entries:
                if chunk is not None:
                    layer_keys.append(chunk.keys[layer])
                    layer_values.append(chunk.values[layer])
                    continue
                got = self.store.get_layer(key, layer)
                if got is None or got[0].shape[1] != length:
                    return None
                layer_keys.append(got[0])
                layer_values.append(got[1])
                nbytes += got[0].nbytes + got[1].nbytes
            return ChunkKV([torch.cat(layer_keys, dim=1)], [torch.cat(layer_values, dim=1)]), nbytes

        return read_layer
