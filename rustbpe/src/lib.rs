//! Python module `rustbpe`: train a byte-level BPE tokenizer with a GPT-4 style regex split,
//! then export it to tiktoken. Drop-in for the PyPI package rustbpe 0.1.0 (same class, methods,
//! defaults and merges).
//!
//! Heavy work runs without the GIL: chunk counting and batch encoding in parallel (rayon),
//! the merge loop on one thread. Progress goes to the Python logger "rustbpe" (INFO).

mod split;
mod train;
mod vocab;

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use pyo3::{ffi, AsPyPointer};
use rayon::prelude::*;

use split::Splitter;
use vocab::Vocab;

/// GPT-4's split pattern (numbers in runs of up to 3 digits); the default when none is given.
const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

fn compile_pattern(pattern: &str) -> PyResult<Splitter> {
    Splitter::new(pattern)
        .map_err(|e| PyValueError::new_err(format!("Invalid regex pattern: {}", e)))
}

/// fancy-regex can fail at match time (backtracking limit on pathological input).
fn split_error(e: fancy_regex::Error) -> PyErr {
    PyValueError::new_err(format!(
        "could not split the text with the regex pattern: {}",
        e
    ))
}

/// Logs to the Python logger "rustbpe"; silently does nothing if logging itself fails.
fn log_info(message: &str) {
    Python::with_gil(|py| {
        let logged = py
            .import("logging")
            .and_then(|logging| logging.call_method1("getLogger", ("rustbpe",)))
            .and_then(|logger| logger.call_method1("info", (message,)));
        drop(logged);
    });
}

/// `next(iterator)` without parking the item in PyO3's GIL pool, which would keep every text
/// of the corpus alive until training returns.
fn next_item(py: Python<'_>, iterator: &Py<PyAny>) -> PyResult<Option<Py<PyAny>>> {
    // SAFETY: `iterator` is a live iterator object (from PyObject_GetIter) and we hold the GIL.
    let item = unsafe { ffi::PyIter_Next(iterator.as_ptr()) };
    if item.is_null() {
        // NULL means exhausted, or an exception raised inside the iterator.
        return match PyErr::take(py) {
            Some(err) => Err(err),
            None => Ok(None),
        };
    }
    // SAFETY: PyIter_Next returned a new (owned) reference, which the Py takes over.
    Ok(Some(unsafe { Py::from_owned_ptr(py, item) }))
}

/// A Byte Pair Encoding tokenizer that matches the GPT-4 style implementation
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    vocab: Vocab,
}

impl Tokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, fancy_regex::Error> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each_chunk(text, |chunk| {
            self.vocab.encode_chunk(chunk.as_bytes(), &mut ids)
        })?;
        Ok(ids)
    }

    /// Pulls up to `buffer_size` strings from the Python iterator into `buffer` (GIL held).
    /// Returns true when the iterator is exhausted.
    fn fill_buffer(
        py: Python<'_>,
        iterator: &Py<PyAny>,
        buffer: &mut Vec<String>,
        buffer_size: usize,
        items_seen: &mut usize,
    ) -> PyResult<bool> {
        buffer.clear();
        py.check_signals()?;
        while buffer.len() < buffer_size {
            let item = match next_item(py, iterator)? {
                Some(item) => item,
                None => return Ok(true),
            };
            let item = item.as_ref(py);
            let text: &PyString = item.downcast().map_err(|_| {
                let type_name = item.get_type().name().unwrap_or("?");
                PyTypeError::new_err(format!(
                    "train_from_iterator: item {} of the iterator is of type {}, expected str",
                    *items_seen, type_name
                ))
            })?;
            buffer.push(text.to_str()?.to_owned());
            *items_seen += 1;
        }
        Ok(false)
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Tokenizer {
            pattern: String::new(),
            splitter: compile_pattern("")?,
            vocab: Vocab::from_merges(Vec::new()),
        })
    }

    /// Train from a streaming iterator (parallel ingestion).
    /// Up to `buffer_size` texts are copied out under the GIL, then split and counted in
    /// parallel without it; the merge loop also runs without the GIL.
    /// `pattern=None` uses the GPT-4 split pattern. Replaces any earlier training.
    #[args(buffer_size = "8192", pattern = "None")]
    #[pyo3(text_signature = "($self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: u32,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the single bytes), got {}",
                vocab_size
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = compile_pattern(&pattern)?;
        let iterator: Py<PyAny> = match iterator.iter() {
            Ok(it) => it.into(),
            Err(err) if err.is_instance_of::<PyTypeError>(py) => {
                return Err(PyTypeError::new_err(format!(
                    "train_from_iterator: expected an iterable of str, got {}",
                    iterator.get_type().name()?
                )))
            }
            Err(err) => return Err(err),
        };

        // 1. Count chunks. The texts are copied out of Python (GIL held), then split and
        //    counted in parallel without the GIL; only new chunks get their own String.
        let mut chunk_counts: AHashMap<String, i64> = AHashMap::new();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
        let mut items_seen = 0usize;
        let started = std::time::Instant::now();
        loop {
            let exhausted =
                Self::fill_buffer(py, &iterator, &mut buffer, buffer_size, &mut items_seen)?;
            let counted = py.allow_threads(|| {
                let counts = train::count_chunks(&splitter, &buffer)?;
                for (chunk, count) in counts {
                    match chunk_counts.get_mut(chunk) {
                        Some(total) => *total += count,
                        None => {
                            chunk_counts.insert(chunk.to_owned(), count);
                        }
                    }
                }
                Ok(())
            });
            counted.map_err(split_error)?;
            if exhausted {
                break;
            }
        }
        log_info(&format!(
            "rustbpe: split {} texts into {} unique chunks in {:.1} s",
            items_seen,
            chunk_counts.len(),
            started.elapsed().as_secs_f64()
        ));

        // 2. Merge. Single-byte chunks hold no pair, so they never matter.
        if chunk_counts.len() > u32::MAX as usize {
            return Err(PyValueError::new_err(
                "too many unique chunks (more than 2^32)",
            ));
        }
        let num_merges = vocab_size - 256;
        let merges = py.allow_threads(|| {
            let (words, counts): (Vec<Vec<u32>>, Vec<i64>) = chunk_counts
                .into_iter()
                .filter(|(chunk, _)| chunk.len() >= 2)
                .map(|(chunk, count)| (chunk.bytes().map(u32::from).collect(), count))
                .unzip();
            train::learn_merges(words, counts, num_merges, &mut |done, total| {
                Python::with_gil(|py| py.check_signals())?;
                log_info(&format!(
                    "rustbpe: merge {}/{} ({:.0}%), {:.1} s",
                    done,
                    total,
                    100.0 * f64::from(done) / f64::from(total),
                    started.elapsed().as_secs_f64()
                ));
                Ok::<(), PyErr>(())
            })
        })?;

        self.pattern = pattern;
        self.splitter = splitter;
        self.vocab = Vocab::from_merges(merges);
        Ok(())
    }

    /// Return the regex pattern
    #[pyo3(text_signature = "($self)")]
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Return the mergeable ranks (token bytes -> token id / rank)
    #[pyo3(text_signature = "($self)")]
    fn get_mergeable_ranks(&self, py: Python<'_>) -> Vec<(Py<PyBytes>, u32)> {
        self.vocab
            .token_bytes()
            .iter()
            .enumerate()
            .map(|(id, bytes)| (PyBytes::new(py, bytes).into(), id as u32))
            .collect()
    }

    /// Return the vocabulary size (256 base bytes + number of merges)
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab.size()
    }

    /// Encode a string into token IDs
    #[pyo3(text_signature = "($self, text)")]
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.encode_text(text))
            .map_err(split_error)
    }

    /// Encode multiple texts in parallel using rayon.
    /// Returns a list of token ID vectors, one per input text.
    #[pyo3(text_signature = "($self, texts)")]
    fn batch_encode(&self, py: Python<'_>, texts: &PyAny) -> PyResult<Vec<Vec<u32>>> {
        // A str is a sequence of str too; refuse it rather than encode it character by character.
        if texts.is_instance_of::<PyString>()? {
            return Err(PyTypeError::new_err(
                "batch_encode: expected a list of str, got a single str (use encode for one text)",
            ));
        }
        let texts: Vec<String> = texts.extract()?;
        py.allow_threads(|| {
            texts
                .par_iter()
                .map(|text| self.encode_text(text))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(split_error)
    }

    /// Decode token IDs back to a string
    #[pyo3(text_signature = "($self, ids)")]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let bytes = self
            .vocab
            .decode_bytes(&ids)
            .map_err(|id| PyValueError::new_err(format!("Unknown token id: {}", id)))?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(err) => Err(PyErr::from_value(PyUnicodeDecodeError::new_utf8(
                py, &bytes, err,
            )?)),
        }
    }
}

#[pymodule]
fn rustbpe(_py: Python<'_>, module: &PyModule) -> PyResult<()> {
    module.add_class::<Tokenizer>()?;
    Ok(())
}
