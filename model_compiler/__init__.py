"""edgefed model compiler: export, quantize, gate, benchmark, package and sign artifacts per profile."""

from model_compiler.compile import CompileOptions, ProfileReport, compile_model

__all__ = ["CompileOptions", "ProfileReport", "compile_model"]
