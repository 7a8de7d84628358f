// Verify an STS access token (RFC 9068) with panva/jose against the STS's published JWKS.
//
//   node verify.mjs <jwks-url> <issuer> <audience>   (the token on standard input)
//
// Prints {"header": ..., "payload": ...} as JSON and exits 0 when jose accepts the
// token; otherwise prints {"code": ..., "message": ..., "claim": ...} to stderr and
// exits 1 (2 for a usage error).
import { readFileSync } from "node:fs";
import { createRemoteJWKSet, jwtVerify } from "jose";

const [jwksUrl, issuer, audience] = process.argv.slice(2);
if (!jwksUrl || !issuer || !audience) {
  console.error("usage: node verify.mjs <jwks-url> <issuer> <audience> < token");
  process.exit(2);
}
const token = readFileSync(0, "utf8").trim();

try {
  const JWKS = createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 5000 });
  const { payload, protectedHeader } = await jwtVerify(token, JWKS, {
    issuer,
    audience,
    typ: "at+jwt",
    algorithms: ["ES256"],
    requiredClaims: ["exp", "iat", "jti", "sub", "client_id"],
  });
  console.log(JSON.stringify({ header: protectedHeader, payload }));
} catch (err) {
  console.error(JSON.stringify({ code: err.code ?? err.name, message: err.message, claim: err.claim }));
  process.exit(1);
}
