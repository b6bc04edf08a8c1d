"""Version numbers of mtp_cy and of the llama.cpp it is built against."""
__version__ = "0.1.0"
#: upstream llama.cpp commit of the vendored source (from the llama-cpp-python 0.3.36 sdist)
LLAMA_CPP_COMMIT = "0c1e57098"
