-- wrk script: POST one signed, compact protocol example (the signature is computed by bench/wrk.sh).
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["SC-Signature"] = os.getenv("CARHOOK_SIG")
local f = assert(io.open(os.getenv("CARHOOK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
