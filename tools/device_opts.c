// device_opts.c — the compute-device options of run and batch: --device cpu|cuda and
// --precision f32|bf16, and the choice of the default device.
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "nm_backend.h"

const char *CLI_DEVICE_HELP =
    "  --device cpu|cuda      compute backend (default: cuda when a CUDA device is present, else cpu);\n"
    "                         an explicit cuda without a device is an error\n"
    "  --precision f32|bf16   cuda only: bf16 keeps GEMM weights and inputs in BF16 with F32\n"
    "                         accumulation (router, norms, softmax stay F32)          (default f32)\n";

int cli_device_option(const char *cmd, const char *name, const char *value, cli_device *d) {
    if (!strcmp(name, "device")) {
        if (strcmp(value, "cpu") && strcmp(value, "cuda"))
            return cli_usage_error(cmd, "--device must be cpu or cuda, got '%s'", value);
        d->device = !strcmp(value, "cpu") ? "cpu" : "cuda";
        return EXIT_OK;
    }
    if (!strcmp(name, "precision")) {
        if (strcmp(value, "f32") && strcmp(value, "bf16"))
            return cli_usage_error(cmd, "--precision must be f32 or bf16, got '%s'", value);
        d->bf16 = !strcmp(value, "bf16");
        return EXIT_OK;
    }
    return -1;
}

int cli_device_resolve(const char *cmd, const cli_device *d, nm_engine_options *out) {
    memset(out, 0, sizeof *out);
    out->device = d->device ? d->device : nm_backend_default_name();
    out->bf16 = d->bf16;
    if (d->bf16 && strcmp(out->device, "cuda"))
        return cli_usage_error(cmd, "--precision bf16 needs the cuda device (the CPU backend computes in F32)");
    const nm_backend_ops *ops;
    nm_error err = {0};
    if (nm_backend_get(out->device, &ops, &err) != NM_OK) {
        nm_error_prefix(&err, "--device %s", out->device);
        return cli_report(cmd, &err);
    }
    return EXIT_OK;
}
