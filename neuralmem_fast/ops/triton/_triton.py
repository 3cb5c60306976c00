"""The one import of triton, with a stand-in that lets the kernel definitions parse when it is absent."""
try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # ImportError, or an install that cannot load its backend
    AVAILABLE = False

    class _Missing:
        """Lets the kernel definitions below parse when triton is absent; never run."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn

    triton = tl = _Missing()
