// nullmap.h — the whole public API of libnullmap in one include.
// Build flags: `pkg-config --cflags --libs nullmap` after `make install PREFIX=…`.
#ifndef NULLMAP_H
#define NULLMAP_H

#include "nm_config.h"     // config.json: parse, validate, write
#include "nm_backend.h"    // compute backends (cpu, cuda): the table of ops the engine drives
#include "nm_engine.h"     // the forward engine (KV cache, prefill, decode, tracing) on a backend
#include "nm_error.h"      // status codes and messages
#include "nm_generate.h"   // image + prompt -> answer + complete trace
#include "nm_image.h"      // PNG/JPEG decode, resize, normalise
#include "nm_limits.h"     // input limits: defaults, ceilings, --set-limit / NULLMAP_LIMIT_*
#include "nm_metrics.h"    // compute score, intensity, distributions, polarization
#include "nm_model.h"      // model load/save/init, tensor table
#include "nm_moe.h"        // the null-expert MoE layer and its router
#include "nm_report.h"    // report.md / .json / .csv of one or more traces
#include "nm_safetensors.h" // safetensors read/write, dtype conversions
#include "nm_tokenizer.h"  // byte tokenizer, sequence layout
#include "nm_train_ops.h"  // forward/backward pairs of the dense ops (f32 and f64), for training
#include "nm_data.h"       // the synthetic training data set: generator and reader
#include "nm_sample.h"     // a data-set record as model input: sequence, pixels, loss targets
#include "nm_eval.h"       // evaluation of a model on a data set split (nullmap eval)
#include "nm_train_moe.h"  // the MoE layer's training forward/backward, L_bal and L_z
#include "nm_train_model.h" // the whole model's training forward/backward over a packed batch
#include "nm_optim.h"      // AdamW, the WSD schedule, gradient clipping
#include "nm_tensor_file.h" // F32 safetensors files (optimizer state)
#include "nm_train.h"      // the training loop: checkpoints, resume, log (nullmap train)
#include "nm_trace.h"      // trace samples and HDF5 trace files

// viz/: the cairo renderers
#include "nm_charts.h"     // modality chart, polarization, zero-vs-null, per-layer strip
#include "nm_overlay.h"    // per-layer compute-map overlays
#include "nm_render.h"     // every picture of a sample or of traces, with the file names the tools use
#include "nm_viz.h"        // canvases (PNG/SVG/PDF), colour maps, fonts

#endif
