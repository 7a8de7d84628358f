// Make a DPoP proof (RFC 9449 §4.2) the way a Node.js client would, with panva/jose alone.
//
//   node dpop_sign.mjs <alg> <htm> <htu> [nonce]
//
// Generates a fresh key pair for <alg>, signs {jti, htm, htu, iat[, nonce]} with the header
// {typ: "dpop+jwt", alg, jwk: <public key>}, and prints {"proof": ..., "thumbprint": <RFC 7638>}.
import { randomUUID } from "node:crypto";
import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair } from "jose";

const [alg, htm, htu, nonce] = process.argv.slice(2);
if (!alg || !htm || !htu) {
  console.error("usage: node dpop_sign.mjs <alg> <htm> <htu> [nonce]");
  process.exit(2);
}
const { publicKey, privateKey } = await generateKeyPair(alg, { extractable: true });
const jwk = await exportJWK(publicKey);
const claims = { htm, htu, jti: randomUUID() };
if (nonce) claims.nonce = nonce;
const proof = await new SignJWT(claims)
  .setProtectedHeader({ typ: "dpop+jwt", alg, jwk })
  .setIssuedAt()
  .sign(privateKey);
console.log(JSON.stringify({ proof, thumbprint: await calculateJwkThumbprint(jwk, "sha256") }));
