"""``jaxgist.tokenizer`` is ``jaxgist.models.clip.tokenizer``: the OpenAI-exact CLIP tokenizer.

    from jaxgist import tokenizer
    tok = tokenizer.load()              # bundled BPE; or an HF directory / hub name
    ids = tok(["a photo of a bird"])    # np.int32 [N, 77], 0-padded
"""

import sys

from jaxgist.models.clip import tokenizer as _tokenizer

sys.modules[__name__] = _tokenizer
