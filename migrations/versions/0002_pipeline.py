"""work queue, routing and embeddings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 22:05:27.064667
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('embedding',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_pk', sa.Integer(), nullable=False),
    sa.Column('route', sa.String(length=32), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_pk'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_pk')
    )
    with op.batch_alter_table('embedding', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_embedding_route'), ['route'], unique=False)

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim_token', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('route', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('route_confidence', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('route_source', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('route_findings', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('processed_at')
        batch_op.drop_column('route_findings')
        batch_op.drop_column('route_source')
        batch_op.drop_column('route_confidence')
        batch_op.drop_column('route')
        batch_op.drop_column('last_error')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('attempts')
        batch_op.drop_column('claimed_at')
        batch_op.drop_column('claim_token')

    with op.batch_alter_table('embedding', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_embedding_route'))

    op.drop_table('embedding')
