// Verify a DPoP proof JWT (RFC 9449 §4.2-4.3) with panva/jose, using the key in its own header.
//
//   node dpop.mjs [htm] [htu]   (the proof on standard input)
//
// Reads the protected header, refuses a "jwk" carrying private members, imports
// the public JWK for the header's alg and verifies the proof with typ dpop+jwt.
// Prints {"header": ..., "payload": ..., "thumbprint": <RFC 7638 SHA-256 of the jwk>}
// and exits 0; otherwise prints {"code": ..., "message": ...} to stderr and exits 1.
import { readFileSync } from "node:fs";
import { calculateJwkThumbprint, decodeProtectedHeader, importJWK, jwtVerify } from "jose";

const [htm, htu] = process.argv.slice(2);
const proof = readFileSync(0, "utf8").trim();
const PRIVATE_MEMBERS = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

function fail(code, message) {
  console.error(JSON.stringify({ code, message }));
  process.exit(1);
}

try {
  const header = decodeProtectedHeader(proof);
  if (!header.jwk || typeof header.jwk !== "object") fail("DPOP_NO_JWK", "no jwk header");
  if (PRIVATE_MEMBERS.some((m) => m in header.jwk)) fail("DPOP_PRIVATE_JWK", "jwk has private members");
  const key = await importJWK(header.jwk, header.alg);
  const { payload, protectedHeader } = await jwtVerify(proof, key, {
    typ: "dpop+jwt",
    algorithms: [header.alg],
    requiredClaims: ["jti", "htm", "htu", "iat"],
    maxTokenAge: "5m",
  });
  if (htm !== undefined && payload.htm !== htm) fail("DPOP_HTM_MISMATCH", `htm ${payload.htm}`);
  if (htu !== undefined && payload.htu !== htu) fail("DPOP_HTU_MISMATCH", `htu ${payload.htu}`);
  const thumbprint = await calculateJwkThumbprint(header.jwk, "sha256");
  console.log(JSON.stringify({ header: protectedHeader, payload, thumbprint }));
} catch (err) {
  fail(err.code ?? err.name, err.message);
}
